//! The Tessera gRPC API, package `tessera.v1`, generated from the `.proto` files in `proto/proto/`.
//!
//! Those files are the public interface; this crate only compiles them (with protox, no system
//! protoc). Domain types live in `tessera-common`; conversions happen at the gRPC edge.
//!
//! # Layout
//! - [`v1`]: the generated messages, clients and servers.
//! - [`etcd`]: etcd's v3 KV, lease and auth clients (for `--store etcd://`).
//! - [`codec`]: prost encoding with small first buffers (what every call and open stream costs).
//! - [`FILE_DESCRIPTOR_SET`]: the encoded descriptors, for gRPC server reflection.

pub mod codec;

#[allow(clippy::all, missing_docs, clippy::unwrap_used)]
pub mod v1 {
    tonic::include_proto!("tessera.v1");
}

/// etcd's v3 API (the part the head's etcd store uses; `proto/etcd/`), clients only.
#[allow(clippy::all, missing_docs, clippy::unwrap_used)]
pub mod etcd {
    pub mod mvccpb {
        tonic::include_proto!("mvccpb");
    }
    pub mod etcdserverpb {
        tonic::include_proto!("etcdserverpb");
    }
}

/// Encoded `FileDescriptorSet` of every tessera.v1 file.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/tessera_v1_descriptor.bin"));
