//! A real CSI gRPC client on tandemd's unix socket, for synchronous tests.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tandem_proto::csi::v1 as csi;
use tonic::transport::Channel;

pub use csi::controller_client::ControllerClient;
pub use csi::identity_client::IdentityClient;
pub use csi::node_client::NodeClient;

/// `--csi-endpoint` flags for a daemon whose socket is `path`.
pub fn csi_args(path: &Path) -> Vec<String> {
    vec![
        "--csi-endpoint".into(),
        format!("unix://{}", path.display()),
    ]
}

/// Clients of the three CSI services over one connection, with a runtime to drive them.
pub struct Csi {
    rt: tokio::runtime::Runtime,
    pub identity: IdentityClient<Channel>,
    pub controller: ControllerClient<Channel>,
    pub node: NodeClient<Channel>,
    pub socket: PathBuf,
}

impl Csi {
    /// Connects to the socket, retrying for up to 30 s: the daemon may still be starting,
    /// and a socket file left by a killed daemon exists before the new one listens.
    pub fn connect(socket: &Path) -> Csi {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let channel = loop {
            let path = socket.to_path_buf();
            let attempt = rt.block_on(
                tonic::transport::Endpoint::try_from("http://[::]:50051")
                    .expect("endpoint")
                    .timeout(Duration::from_secs(120))
                    .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
                        let path = path.clone();
                        async move {
                            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                                tokio::net::UnixStream::connect(path).await?,
                            ))
                        }
                    })),
            );
            match attempt {
                Ok(ch) => break ch,
                Err(e) => {
                    assert!(
                        std::time::Instant::now() < deadline,
                        "cannot connect to the CSI socket {}: {e}",
                        socket.display()
                    );
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        };
        Csi {
            rt,
            identity: IdentityClient::new(channel.clone()),
            controller: ControllerClient::new(channel.clone()),
            node: NodeClient::new(channel),
            socket: socket.to_path_buf(),
        }
    }

    /// Runs one call to completion.
    pub fn call<T, F: Future<Output = Result<tonic::Response<T>, tonic::Status>>>(
        &self,
        f: F,
    ) -> Result<T, tonic::Status> {
        self.rt.block_on(f).map(tonic::Response::into_inner)
    }
}

/// A mount capability (`fs` may be empty).
pub fn mount_cap(
    fs: &str,
    mode: csi::volume_capability::access_mode::Mode,
) -> csi::VolumeCapability {
    csi::VolumeCapability {
        access_type: Some(csi::volume_capability::AccessType::Mount(
            csi::volume_capability::MountVolume {
                fs_type: fs.into(),
                mount_flags: vec![],
                volume_mount_group: String::new(),
            },
        )),
        access_mode: Some(csi::volume_capability::AccessMode { mode: mode as i32 }),
    }
}

/// A raw block capability.
pub fn block_cap(mode: csi::volume_capability::access_mode::Mode) -> csi::VolumeCapability {
    csi::VolumeCapability {
        access_type: Some(csi::volume_capability::AccessType::Block(
            csi::volume_capability::BlockVolume {},
        )),
        access_mode: Some(csi::volume_capability::AccessMode { mode: mode as i32 }),
    }
}

/// Single-node writer, the common case.
pub const RWO: csi::volume_capability::access_mode::Mode =
    csi::volume_capability::access_mode::Mode::SingleNodeWriter;
