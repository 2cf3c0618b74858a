//! Helpers shared by the store's test modules.

use super::*;
use crate::io::{IoEngine, IoEngineChoice};

pub(super) fn engines() -> Vec<IoEngine> {
    vec![
        IoEngine::Std,
        IoEngine::new(IoEngineChoice::Uring).expect("io_uring must work on the test machines"),
    ]
}

pub(super) async fn open(
    dir: &Path,
    engine: &IoEngine,
    pool_bytes: u64,
    size: u64,
) -> Arc<Replica> {
    let pool = Pool::open(dir, pool_bytes, engine.clone()).unwrap();
    pool.open_replica("r1", "vol1", size).await.unwrap()
}

pub(super) fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}
