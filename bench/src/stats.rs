//! Small statistics helpers: latency percentiles from raw samples, medians over rounds.

/// Latency percentiles in microseconds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Percentiles {
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub mean_us: f64,
    pub samples: usize,
}

impl Percentiles {
    /// Percentiles of raw samples in nanoseconds (nearest rank). Zero samples give zeros,
    /// which the record checks reject.
    pub fn from_ns(mut ns: Vec<u64>) -> Percentiles {
        ns.sort_unstable();
        let at = |q: f64| -> f64 {
            if ns.is_empty() {
                return 0.0;
            }
            let rank = ((q * ns.len() as f64).ceil() as usize).clamp(1, ns.len());
            ns[rank - 1] as f64 / 1000.0
        };
        let mean_us = if ns.is_empty() {
            0.0
        } else {
            ns.iter().map(|&v| v as f64).sum::<f64>() / ns.len() as f64 / 1000.0
        };
        Percentiles {
            p50_us: at(0.50),
            p99_us: at(0.99),
            p999_us: at(0.999),
            mean_us,
            samples: ns.len(),
        }
    }
}

/// Median of the values (the mean of the middle two for an even count); `None` if empty.
pub fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let p = Percentiles::from_ns((1..=1000).map(|i| i * 1000).collect());
        assert_eq!(p.p50_us, 500.0);
        assert_eq!(p.p99_us, 990.0);
        assert_eq!(p.p999_us, 999.0);
        assert_eq!(p.samples, 1000);
    }

    #[test]
    fn median_of_even_count_is_the_middle_mean() {
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(vec![]), None);
    }
}
