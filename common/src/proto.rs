//! Generated protobuf and gRPC code for every package under `proto/`.

#![allow(clippy::all, missing_docs)]

pub mod kv {
    pub mod v1 {
        tonic::include_proto!("tern.kv.v1");
    }
}

pub mod admin {
    pub mod v1 {
        tonic::include_proto!("tern.admin.v1");
    }
}

pub mod replication {
    pub mod v1 {
        tonic::include_proto!("tern.replication.v1");
    }
}

pub mod binlog {
    pub mod v1 {
        tonic::include_proto!("tern.binlog.v1");
    }
}

/// Encoded `FileDescriptorSet` of all tern packages, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("tern_descriptor");
