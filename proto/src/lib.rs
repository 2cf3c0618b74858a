//! Generated gRPC types and services: Tandem's admin API (`tandem.v1`) and the Container
//! Storage Interface (`csi.v1`, from `csi/v1/csi.proto`).

#![allow(clippy::all, missing_docs)]

pub mod tandem {
    pub mod v1 {
        tonic::include_proto!("tandem.v1");
    }
}

pub use tandem::v1 as admin;

pub mod csi {
    pub mod v1 {
        tonic::include_proto!("csi.v1");
    }
}
