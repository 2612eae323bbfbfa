//! INFO and ROLE of the RESP front, from the node's `Admin.Info`: Redis's
//! field names where the meaning is the same (a replication offset is a
//! binlog index here), tern's own fields prefixed `tern_`.

use std::fmt::Write;

use redis_protocol::resp2::types::BytesFrame;

use crate::proto::admin::v1 as admin;

/// What INFO shows beyond `Admin.Info`.
pub struct Extra {
    pub tcp_port: u16,
    pub uptime_secs: u64,
    pub connected_clients: u64,
    pub total_connections: u64,
    pub total_commands: u64,
    /// Keys in the keyspace (only computed when the keyspace section is asked for).
    pub keys: Option<u64>,
}

/// Sections INFO knows, in order.
const SECTIONS: [&str; 5] = ["server", "clients", "replication", "stats", "keyspace"];

/// The INFO text for `asked` sections (none, `all`, `everything` or
/// `default`: every section).
pub fn render(info: &admin::InfoResponse, extra: &Extra, asked: &[String]) -> String {
    let all = asked.is_empty()
        || asked
            .iter()
            .any(|a| matches!(a.as_str(), "all" | "everything" | "default"));
    let mut out = String::new();
    for section in SECTIONS {
        if !all && !asked.iter().any(|a| a == section) {
            continue;
        }
        if !out.is_empty() {
            out.push_str("\r\n");
        }
        match section {
            "server" => server(&mut out, info, extra),
            "clients" => {
                out.push_str("# Clients\r\n");
                line(&mut out, "connected_clients", extra.connected_clients);
            }
            "replication" => replication(&mut out, info),
            "stats" => stats(&mut out, info, extra),
            _ => {
                out.push_str("# Keyspace\r\n");
                if let Some(keys) = extra.keys.filter(|&k| k > 0) {
                    line(&mut out, "db0", format!("keys={keys},expires=0,avg_ttl=0"));
                }
            }
        }
    }
    out
}

/// Whether INFO for `asked` needs the key count (a pass over the keys).
pub fn wants_keyspace(asked: &[String]) -> bool {
    asked.is_empty()
        || asked
            .iter()
            .any(|a| matches!(a.as_str(), "all" | "everything" | "default" | "keyspace"))
}

fn line(out: &mut String, name: &str, value: impl std::fmt::Display) {
    let _ = write!(out, "{name}:{value}\r\n");
}

fn server(out: &mut String, info: &admin::InfoResponse, extra: &Extra) {
    out.push_str("# Server\r\n");
    // Clients and tools read redis_version to pick features: tern speaks
    // the RESP2 commands of Redis 7.0 that it implements.
    line(out, "redis_version", "7.0.0");
    line(out, "redis_mode", "standalone");
    line(out, "tern_version", &info.version);
    line(out, "os", std::env::consts::OS);
    line(out, "arch_bits", usize::BITS);
    line(out, "process_id", std::process::id());
    line(out, "run_id", &info.repl_id);
    line(out, "tcp_port", extra.tcp_port);
    line(out, "uptime_in_seconds", extra.uptime_secs);
    line(out, "uptime_in_days", extra.uptime_secs / 86_400);
}

fn replication(out: &mut String, info: &admin::InfoResponse) {
    out.push_str("# Replication\r\n");
    let counters = info.counters.unwrap_or_default();
    if info.role == "master" {
        line(out, "role", "master");
        line(
            out,
            "connected_slaves",
            info.slaves.iter().filter(|s| s.session_id != 0).count(),
        );
        for (n, s) in info.slaves.iter().filter(|s| s.session_id != 0).enumerate() {
            let (ip, port) = split_addr(&s.addr);
            let state = if s.state == "streaming" {
                "online"
            } else {
                s.state.as_str()
            };
            line(
                out,
                &format!("slave{n}"),
                format!(
                    "ip={ip},port={port},state={state},offset={},lag={}",
                    s.received_index,
                    s.lag_ms / 1000
                ),
            );
        }
    } else {
        let link = info.link.clone().unwrap_or_default();
        let (host, port) = split_url(&link.master);
        line(out, "role", "slave");
        line(out, "master_host", host);
        line(out, "master_port", port);
        line(
            out,
            "master_link_status",
            if link.state == "connected" {
                "up"
            } else {
                "down"
            },
        );
        line(
            out,
            "master_sync_in_progress",
            u8::from(link.state == "wait_db_sync"),
        );
        line(out, "slave_repl_offset", link.received_index);
        line(out, "slave_read_only", 1);
        line(
            out,
            "connected_slaves",
            info.slaves.iter().filter(|s| s.session_id != 0).count(),
        );
        line(out, "tern_link_state", &link.state);
        // Without `,` and `=`: clients (redis-py) read a value holding both
        // as a list of `k=v` pairs and fail on any other part.
        line(
            out,
            "tern_link_last_error",
            link.last_error
                .replace(['\r', '\n'], " ")
                .replace([',', '='], ";"),
        );
        line(out, "tern_read_floor", info.read_floor);
    }
    line(out, "master_replid", &info.repl_id);
    if let Some(h) = info.histories.last() {
        line(out, "master_replid2", &h.repl_id);
        line(out, "second_repl_offset", h.end_index + 1);
    } else {
        line(out, "master_replid2", "0".repeat(40));
        line(out, "second_repl_offset", -1);
    }
    line(out, "master_repl_offset", info.last_index);
    line(out, "repl_backlog_first_byte_offset", info.first_index);
    line(out, "repl_backlog_histlen", info.binlog_bytes);
    line(out, "tern_applied_index", info.applied_index);
    line(out, "tern_durable_index", info.durable_index);
    line(out, "tern_fsync", &info.fsync);
    line(out, "tern_histories", info.histories.len());
    line(out, "tern_duplicates_skipped", counters.duplicates_skipped);
}

fn stats(out: &mut String, info: &admin::InfoResponse, extra: &Extra) {
    let c = info.counters.unwrap_or_default();
    out.push_str("# Stats\r\n");
    line(out, "total_connections_received", extra.total_connections);
    line(out, "total_commands_processed", extra.total_commands);
    line(out, "sync_full", c.full_syncs);
    line(out, "sync_partial_ok", c.partial_syncs);
    line(out, "tern_transactions_committed", c.transactions_committed);
    line(out, "tern_commit_groups", c.commit_groups);
    line(out, "tern_inline_commit_groups", c.inline_commit_groups);
    line(out, "tern_write_errors", c.write_errors);
    line(out, "tern_reconnects", c.reconnects);
    line(out, "tern_stale_messages", c.stale_messages);
    line(out, "tern_reads_refused", c.reads_refused);
    line(out, "tern_auth_failures", c.auth_failures);
}

/// `ip:port` → (ip, port); the whole text and 0 if it has no port.
fn split_addr(addr: &str) -> (&str, u16) {
    match addr.rsplit_once(':') {
        Some((ip, port)) => (
            ip.trim_start_matches('[').trim_end_matches(']'),
            port.parse().unwrap_or(0),
        ),
        None => (addr, 0),
    }
}

/// `http://host:port/...` → (host, port).
fn split_url(url: &str) -> (&str, u16) {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let hostport = rest.split('/').next().unwrap_or(rest);
    split_addr(hostport)
}

fn bulk(s: impl Into<bytes::Bytes>) -> BytesFrame {
    BytesFrame::BulkString(s.into())
}

/// ROLE: `["master", offset, [[ip, port, offset], ...]]` or `["slave",
/// host, port, state, offset]`.
pub fn role(info: &admin::InfoResponse) -> BytesFrame {
    if info.role == "master" {
        let slaves = info
            .slaves
            .iter()
            .filter(|s| s.session_id != 0)
            .map(|s| {
                let (ip, port) = split_addr(&s.addr);
                BytesFrame::Array(vec![
                    bulk(ip.to_string()),
                    bulk(port.to_string()),
                    bulk(s.received_index.to_string()),
                ])
            })
            .collect();
        BytesFrame::Array(vec![
            bulk("master"),
            BytesFrame::Integer(info.last_index as i64),
            BytesFrame::Array(slaves),
        ])
    } else {
        let link = info.link.clone().unwrap_or_default();
        let (host, port) = split_url(&link.master);
        let state = match link.state.as_str() {
            "connected" => "connected",
            "wait_db_sync" => "sync",
            "wait_reply" | "try_connect" => "connecting",
            _ => "connect",
        };
        BytesFrame::Array(vec![
            bulk("slave"),
            bulk(host.to_string()),
            BytesFrame::Integer(port as i64),
            bulk(state),
            BytesFrame::Integer(link.received_index as i64),
        ])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_and_urls_split() {
        assert_eq!(split_addr("127.0.0.1:7401"), ("127.0.0.1", 7401));
        assert_eq!(split_addr("[::1]:7401"), ("::1", 7401));
        assert_eq!(split_url("http://10.0.0.2:7400"), ("10.0.0.2", 7400));
        assert_eq!(split_url("https://m.example:7400/"), ("m.example", 7400));
    }

    #[test]
    fn master_info_has_redis_fields() {
        let info = admin::InfoResponse {
            role: "master".into(),
            repl_id: "ab".into(),
            last_index: 42,
            slaves: vec![admin::SlaveInfo {
                id: "s".into(),
                addr: "127.0.0.1:7401".into(),
                state: "streaming".into(),
                session_id: 7,
                received_index: 40,
                lag_ms: 2500,
                ..Default::default()
            }],
            ..Default::default()
        };
        let extra = Extra {
            tcp_port: 6379,
            uptime_secs: 5,
            connected_clients: 1,
            total_connections: 3,
            total_commands: 9,
            keys: Some(12),
        };
        let text = render(&info, &extra, &[]);
        for want in [
            "role:master\r\n",
            "connected_slaves:1\r\n",
            "slave0:ip=127.0.0.1,port=7401,state=online,offset=40,lag=2\r\n",
            "master_repl_offset:42\r\n",
            "db0:keys=12,expires=0,avg_ttl=0\r\n",
            "# Stats\r\n",
        ] {
            assert!(text.contains(want), "{want:?} missing in {text}");
        }
        let only = render(&info, &extra, &["replication".to_string()]);
        assert!(only.starts_with("# Replication\r\n") && !only.contains("# Server"));
    }
}
