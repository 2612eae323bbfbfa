//! One sync session is one trace across both processes: the slave's session
//! span and the master's are exported over OTLP to a collector run by this test,
//! share a trace id, and the master's span is a child of the slave's.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;
use tern_common::proto::kv::v1::PutRequest;
use tern_integration::{Node, TestDir};
use tokio_stream::wrappers::TcpListenerStream;

/// A span as received, with the `service.name` of the process that sent it.
#[derive(Clone, Debug)]
struct Received {
    service: String,
    span: Span,
}

#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<Received>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap();
        for rs in req.into_inner().resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| r.attributes.iter())
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| kv.value.as_ref()?.value.as_ref())
                .map(|v| match v {
                    Value::StringValue(s) => s.clone(),
                    other => format!("{other:?}"),
                })
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for span in ss.spans {
                    spans.push(Received {
                        service: service.clone(),
                        span,
                    });
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

fn attr(span: &Span, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref()?.value.as_ref())
        .map(|v| match v {
            Value::StringValue(s) => s.clone(),
            Value::IntValue(i) => i.to_string(),
            other => format!("{other:?}"),
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_session_is_one_trace_across_master_and_slave() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let collector = Collector::default();
    let server = tonic::transport::Server::builder()
        .add_service(TraceServiceServer::new(collector.clone()))
        .serve_with_incoming(TcpListenerStream::new(listener));
    tokio::spawn(server);

    let dir = TestDir::new("traces");
    let env = [("TERN__TELEMETRY__OTLP_ENDPOINT", endpoint.as_str())];
    let mut master = Node::start_master(&dir.join("master"), &env, &[])
        .await
        .unwrap();
    let mut slave = Node::start_slave(&dir.join("slave"), &master.url(), &env, &[])
        .await
        .unwrap();
    let mut kv = master.kv();
    let mut last = 0;
    for i in 0..10u32 {
        let r = kv
            .put(PutRequest {
                key: format!("k{i}").into(),
                value: "v".into(),
                ..Default::default()
            })
            .await
            .unwrap();
        last = r.into_inner().index;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while slave.info().await.unwrap().applied_index < last {
        assert!(Instant::now() < deadline, "slave did not reach {last}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let slave_info = slave.info().await.unwrap();
    let session_id = slave_info.link.unwrap().session_id;
    assert!(session_id > 0);
    // Ending both processes cleanly ends the session spans and flushes export.
    assert!(slave.sigterm_and_wait().await.unwrap().success());
    assert!(master.sigterm_and_wait().await.unwrap().success());

    let spans = collector.spans.lock().unwrap().clone();
    let sessions: Vec<&Received> = spans
        .iter()
        .filter(|r| r.span.name == "sync_session")
        .collect();
    let slave_span = sessions
        .iter()
        .find(|r| {
            r.service == "tern-slave" && attr(&r.span, "session_id") == Some(session_id.to_string())
        })
        .unwrap_or_else(|| {
            panic!("no slave sync_session span for session {session_id} in {sessions:#?}")
        });
    let master_span = sessions
        .iter()
        .find(|r| {
            r.service == "tern-master"
                && attr(&r.span, "session_id") == Some(session_id.to_string())
        })
        .unwrap_or_else(|| {
            panic!("no master sync_session span for session {session_id} in {sessions:#?}")
        });
    assert_eq!(
        master_span.span.trace_id, slave_span.span.trace_id,
        "both sides of one session share a trace id"
    );
    assert_eq!(
        master_span.span.parent_span_id, slave_span.span.span_id,
        "the master's session span is a child of the slave's"
    );
    let slave_id = attr(&slave_span.span, "slave_id").expect("slave span has slave_id");
    assert_eq!(attr(&master_span.span, "slave_id"), Some(slave_id));
    assert_eq!(
        attr(&master_span.span, "repl_id"),
        Some(slave_info.repl_id.clone())
    );
    assert!(
        attr(&master_span.span, "outcome").is_some(),
        "outcome recorded: {master_span:?}"
    );
    assert!(
        attr(&slave_span.span, "outcome").is_some(),
        "outcome recorded: {slave_span:?}"
    );
}
