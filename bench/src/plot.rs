//! SVG plots of a run (plotters, SVG backend only; text is left to the SVG viewer, so no
//! system fonts are needed): latency against injected RTT with the model line, latency
//! against RF, and IOPS against the number of volumes.

use std::path::Path;

use anyhow::{anyhow, Result};
use plotters::prelude::*;

use crate::record::{Record, LOCAL, QEMU_NBD, TANDEM};
use crate::workload::{Workload, SCALE_WORKLOAD};

pub const LATENCY_VS_RTT: &str = "latency_vs_rtt.svg";
pub const LATENCY_VS_RF: &str = "latency_vs_rf.svg";
pub const IOPS_VS_VOLUMES: &str = "iops_vs_volumes.svg";

const SIZE: (u32, u32) = (800, 480);
const PALETTE: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(127, 127, 127),
];

fn plot_err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("draw a plot: {e:?}")
}

/// One line of a chart.
struct Line {
    label: String,
    points: Vec<(f64, f64)>,
    color: RGBColor,
    markers: bool,
}

/// Axes and labels of a chart.
struct Axes<'a> {
    caption: &'a str,
    x_desc: &'a str,
    y_desc: &'a str,
    x_min: f64,
    /// Label only whole numbers on the x axis (RF, volume counts).
    integer_x: bool,
    legend: SeriesLabelPosition,
}

fn chart(path: &Path, axes: Axes<'_>, lines: &[Line]) -> Result<()> {
    let Axes {
        caption,
        x_desc,
        y_desc,
        x_min,
        integer_x,
        legend,
    } = axes;
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let all = lines.iter().flat_map(|l| l.points.iter());
    let x_max = all.clone().map(|p| p.0).fold(x_min + 1.0, f64::max);
    let x_pad = if integer_x {
        0.1
    } else {
        0.05 * (x_max - x_min)
    };
    let y_max = all.map(|p| p.1).fold(1e-9, f64::max) * 1.15;
    let mut c = ChartBuilder::on(&root)
        .caption(caption, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(
            x_min - if integer_x { x_pad } else { 0.0 }..x_max + x_pad,
            0f64..y_max,
        )
        .map_err(plot_err)?;
    let whole = |x: &f64| {
        if (x - x.round()).abs() < 1e-9 {
            format!("{x:.0}")
        } else {
            String::new()
        }
    };
    let plain = |x: &f64| format!("{x}");
    let x_fmt: &dyn Fn(&f64) -> String = if integer_x { &whole } else { &plain };
    let y_fmt = move |y: &f64| {
        if y_max > 100.0 {
            format!("{y:.0}")
        } else {
            format!("{y:.1}")
        }
    };
    c.configure_mesh()
        .x_label_formatter(x_fmt)
        .y_label_formatter(&y_fmt)
        .x_desc(x_desc)
        .y_desc(y_desc)
        .draw()
        .map_err(plot_err)?;
    for l in lines {
        if l.points.is_empty() {
            continue;
        }
        let color = l.color;
        c.draw_series(LineSeries::new(l.points.clone(), color.stroke_width(2)))
            .map_err(plot_err)?
            .label(l.label.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        if l.markers {
            c.draw_series(
                l.points
                    .iter()
                    .map(|&(x, y)| Circle::new((x, y), 4, color.filled())),
            )
            .map_err(plot_err)?;
        }
    }
    c.configure_series_labels()
        .position(legend)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(plot_err)?;
    root.present().map_err(plot_err)?;
    Ok(())
}

fn sorted(mut v: Vec<(f64, f64)>) -> Vec<(f64, f64)> {
    v.sort_by(|a, b| a.0.total_cmp(&b.0));
    v
}

/// Draws the three plots into `dir`.
pub fn draw_all(records: &[Record], dir: &Path) -> Result<()> {
    let qd1 = Workload::RandWriteQd1.name();
    let tandem_qd1 = |r: &&Record| r.target == TANDEM && r.workload == qd1 && r.volumes == 1;

    // Latency against RTT, one measured line and one model line per replicated RF.
    let mut rfs: Vec<u32> = records
        .iter()
        .filter(tandem_qd1)
        .filter(|r| r.rf >= 2)
        .map(|r| r.rf)
        .collect();
    rfs.sort_unstable();
    rfs.dedup();
    let mut lines = Vec::new();
    let mut model_drawn = false;
    for (i, rf) in rfs.iter().enumerate() {
        let pts = |f: fn(&Record) -> Option<f64>| {
            sorted(
                records
                    .iter()
                    .filter(tandem_qd1)
                    .filter(|r| r.rf == *rf)
                    .filter_map(|r| Some((r.rtt_ms, f(r)? / 1000.0)))
                    .collect(),
            )
        };
        lines.push(Line {
            label: format!("RF {rf}: measured p50"),
            points: pts(|r| r.p50_us),
            color: PALETTE[i % PALETTE.len()],
            markers: true,
        });
        // The model does not depend on the RF (the remote replicas are written in
        // parallel), so one line stands for every RF.
        if !model_drawn {
            lines.push(Line {
                label: "model: local store write + measured RTT".into(),
                points: pts(|r| r.model_us),
                color: PALETTE[5],
                markers: false,
            });
            model_drawn = true;
        }
    }
    chart(
        &dir.join(LATENCY_VS_RTT),
        Axes {
            caption: "4 KiB random write QD1: p50 latency against injected RTT",
            x_desc: "injected round-trip time between nodes (ms)",
            y_desc: "p50 latency (ms)",
            x_min: 0.0,
            integer_x: false,
            legend: SeriesLabelPosition::UpperLeft,
        },
        &lines,
    )?;

    // Latency against RF at RTT 0, with the baselines as flat lines.
    let at0: Vec<&Record> = records
        .iter()
        .filter(tandem_qd1)
        .filter(|r| r.rtt_ms == 0.0)
        .collect();
    let rf_pts = |f: fn(&Record) -> Option<f64>| {
        sorted(
            at0.iter()
                .filter_map(|r| Some((r.rf as f64, f(r)?)))
                .collect(),
        )
    };
    let rf_max = at0.iter().map(|r| r.rf).max().unwrap_or(1) as f64;
    let flat = |target: &str| -> Vec<(f64, f64)> {
        records
            .iter()
            .find(|r| r.target == target && r.workload == qd1)
            .and_then(|r| r.p50_us)
            .map(|p| vec![(1.0, p), (rf_max, p)])
            .unwrap_or_default()
    };
    let lines = vec![
        Line {
            label: "tandem p50".into(),
            points: rf_pts(|r| r.p50_us),
            color: PALETTE[0],
            markers: true,
        },
        Line {
            label: "tandem p99".into(),
            points: rf_pts(|r| r.p99_us),
            color: PALETTE[1],
            markers: true,
        },
        Line {
            label: "qemu-nbd p50 (one copy)".into(),
            points: flat(QEMU_NBD),
            color: PALETTE[3],
            markers: false,
        },
        Line {
            label: "local store p50 (no network)".into(),
            points: flat(LOCAL),
            color: PALETTE[5],
            markers: false,
        },
    ];
    chart(
        &dir.join(LATENCY_VS_RF),
        Axes {
            caption: "4 KiB random write QD1 latency against replication factor (no injected RTT)",
            x_desc: "replication factor",
            y_desc: "latency (µs)",
            x_min: 1.0,
            integer_x: true,
            legend: SeriesLabelPosition::UpperLeft,
        },
        &lines,
    )?;

    // Aggregate IOPS against volumes written at once.
    let scale: Vec<&Record> = records
        .iter()
        .filter(|r| r.workload == SCALE_WORKLOAD)
        .collect();
    let rf = scale.first().map(|r| r.rf).unwrap_or(0);
    let lines = vec![
        Line {
            label: format!("tandem RF {rf}: aggregate IOPS"),
            points: sorted(
                scale
                    .iter()
                    .filter_map(|r| Some((r.volumes as f64, r.iops?)))
                    .collect(),
            ),
            color: PALETTE[0],
            markers: true,
        },
        Line {
            label: "per volume".into(),
            points: sorted(
                scale
                    .iter()
                    .filter_map(|r| Some((r.volumes as f64, r.iops? / r.volumes as f64)))
                    .collect(),
            ),
            color: PALETTE[3],
            markers: true,
        },
    ];
    chart(
        &dir.join(IOPS_VS_VOLUMES),
        Axes {
            caption: "4 KiB random write, QD32 per volume: IOPS against volumes written at once",
            x_desc: "volumes written at once",
            y_desc: "IOPS",
            x_min: 1.0,
            integer_x: true,
            legend: SeriesLabelPosition::LowerLeft,
        },
        &lines,
    )?;
    Ok(())
}
