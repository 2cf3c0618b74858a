//! Generated gRPC types and services for Tandem's admin API (`tandem.v1`).
//!
//! The CSI API (`csi.v1`) joins this crate with the CSI frontend.

#![allow(clippy::all, missing_docs)]

pub mod tandem {
    pub mod v1 {
        tonic::include_proto!("tandem.v1");
    }
}

pub use tandem::v1 as admin;
