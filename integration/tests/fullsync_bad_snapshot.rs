//! A slave refuses a broken snapshot: a chunk whose crc32c is wrong, a file
//! shorter than its header says, or a file whose whole-file crc32c does not
//! match. Each is a typed error in the slave's Info (`link.last_error`), nothing
//! is swapped in (the slave's state stays what it was), and it keeps retrying.
//! The master here is a fake that serves exactly those snapshots.

mod support;

use std::pin::Pin;
use std::time::Duration;

use support::{DEADLINE, describe_slave, slave_counters, slave_link, wait_until};
use tern_common::proto::replication::v1 as pb;
use tern_common::proto::replication::v1::replication_server::{Replication, ReplicationServer};
use tern_integration::{Node, TestDir};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};

#[derive(Clone, Copy)]
enum Broken {
    ChunkCrc,
    Truncated,
    WholeFileCrc,
}

struct FakeMaster {
    broken: Broken,
}

const CONTENT: &[u8] = b"MANIFEST-000001\n";

type Out<T> = Pin<Box<dyn tokio_stream::Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl Replication for FakeMaster {
    type SyncStream = Out<pb::MasterMessage>;
    type DbSyncStream = Out<pb::DbSyncChunk>;

    async fn sync(
        &self,
        req: Request<Streaming<pb::SlaveMessage>>,
    ) -> Result<Response<Self::SyncStream>, Status> {
        let mut inbound = req.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            let _ = inbound.message().await;
            let resp = pb::TrySyncResponse {
                code: pb::TrySyncCode::NeedFullSync as i32,
                reason: pb::FullSyncReason::UnknownReplId as i32,
                repl_id: "0123456789abcdef0123456789abcdef".into(),
                message: "fake master: full sync".into(),
                ..Default::default()
            };
            let msg = pb::MasterMessage {
                msg: Some(pb::master_message::Msg::TrySyncResponse(resp)),
            };
            let _ = tx.send(Ok(msg)).await;
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn db_sync(
        &self,
        _req: Request<pb::DbSyncRequest>,
    ) -> Result<Response<Self::DbSyncStream>, Status> {
        let (size, file_crc, data, chunk_crc) = match self.broken {
            Broken::ChunkCrc => (
                CONTENT.len() as u64,
                crc32c::crc32c(CONTENT),
                CONTENT.to_vec(),
                crc32c::crc32c(CONTENT) ^ 1,
            ),
            Broken::Truncated => (
                2 * CONTENT.len() as u64,
                0,
                CONTENT.to_vec(),
                crc32c::crc32c(CONTENT),
            ),
            Broken::WholeFileCrc => (
                CONTENT.len() as u64,
                crc32c::crc32c(CONTENT) ^ 1,
                CONTENT.to_vec(),
                crc32c::crc32c(CONTENT),
            ),
        };
        let header = pb::DbSyncHeader {
            snapshot_id: "00000000deadbeef".into(),
            repl_id: "0123456789abcdef0123456789abcdef".into(),
            index: 41,
            files: vec![pb::SnapshotFile {
                name: "CURRENT".into(),
                size,
                crc32c: file_crc,
            }],
            total_bytes: size,
            last_seq: 7,
            bytes_to_send: size,
        };
        let msgs = vec![
            Ok(pb::DbSyncChunk {
                kind: Some(pb::db_sync_chunk::Kind::Header(header)),
            }),
            Ok(pb::DbSyncChunk {
                kind: Some(pb::db_sync_chunk::Kind::Data(pb::FileChunk {
                    name: "CURRENT".into(),
                    offset: 0,
                    data: data.into(),
                    crc32c: chunk_crc,
                })),
            }),
            Ok(pb::DbSyncChunk {
                kind: Some(pb::db_sync_chunk::Kind::Done(pb::DbSyncDone {
                    bytes_sent: size,
                })),
            }),
        ];
        Ok(Response::new(Box::pin(tokio_stream::iter(msgs))))
    }
}

async fn refuses(broken: Broken, name: &str, expect: &str) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(ReplicationServer::new(FakeMaster { broken }))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    let dir = TestDir::new(name);
    let slave = Node::start_slave(&dir.join("slave"), &url, &[], &[])
        .await
        .unwrap();
    let before = slave.checksum().await.unwrap();
    let info = wait_until(
        &format!("the slave to refuse the {name} snapshot"),
        DEADLINE,
        || async {
            let i = slave.info().await.map_err(|e| format!("{e:#}"))?;
            if slave_link(&i).last_error.contains(expect) {
                Ok(Some(i))
            } else {
                Err(describe_slave(&i))
            }
        },
    )
    .await;
    assert_eq!(
        slave_link(&info).state,
        "wait_db_sync",
        "{}",
        describe_slave(&info)
    );
    // It keeps trying; give it a few more attempts, then check nothing moved.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let info = slave.info().await.unwrap();
    assert_eq!(
        slave_counters(&info).full_syncs,
        0,
        "{}",
        describe_slave(&info)
    );
    assert_eq!(info.applied_index, 0, "{}", describe_slave(&info));
    assert_eq!(
        slave.checksum().await.unwrap(),
        before,
        "nothing was swapped in"
    );
    let staged = dir.join("slave").join("fullsync");
    let ready = walk(&staged).into_iter().any(|p| p.ends_with("READY"));
    assert!(!ready, "a broken snapshot is never marked READY");
}

fn walk(p: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(p) {
        for e in rd.flatten() {
            let path = e.path();
            if path.is_dir() {
                out.extend(walk(&path));
            }
            out.push(path);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunk_with_a_wrong_checksum_is_refused() {
    refuses(Broken::ChunkCrc, "bad-chunk-crc", "fails its crc32c").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_file_is_refused() {
    refuses(Broken::Truncated, "truncated-file", "wrong checksum").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_with_a_wrong_checksum_is_refused() {
    refuses(Broken::WholeFileCrc, "bad-file-crc", "wrong checksum").await;
}
