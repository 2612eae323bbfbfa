//! The commands of the RESP front.
//!
//! Every data command is **planned** into tern ops ([`WriteOp`]) plus how its
//! reply is made from their outcomes ([`Finish`]). A plan of reads only
//! (GET, MGET, EXISTS, STRLEN) runs against RocksDB directly; any other runs
//! as one transaction on the write path, so MSET, DEL of many keys and a
//! whole MULTI/EXEC block are atomic, and reads inside MULTI see the block's
//! own writes (they are ops of the same transaction). One difference from
//! Redis: a transaction is all or nothing, so an error at run time (INCR of
//! a value that is not an integer) fails the whole EXEC, not just that
//! command.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use redis_protocol::resp2::types::BytesFrame;
use tonic::{Code, Status};

use super::{Connection, Queued, info};
use crate::kv::{OpOutcome, PendingWrite, WriteOp, WriteOptions, WriteOutcome, replicas_short};
use crate::limits;
use crate::proto::admin::v1 as admin;

/// A reply that comes once a queued write commits.
pub(super) type PendingReply = Pin<Box<dyn Future<Output = BytesFrame> + Send>>;

const READONLY: &str = "READONLY You can't write against a read only replica.";
/// SCAN's COUNT when not given, and the most it may ask for.
const SCAN_COUNT: usize = 10;
const MAX_SCAN_COUNT: usize = 100_000;

fn err(msg: impl Into<String>) -> BytesFrame {
    BytesFrame::Error(msg.into().into())
}

fn ok() -> BytesFrame {
    BytesFrame::SimpleString(Bytes::from_static(b"OK"))
}

fn bulk(b: impl Into<Bytes>) -> BytesFrame {
    BytesFrame::BulkString(b.into())
}

fn int(n: i64) -> BytesFrame {
    BytesFrame::Integer(n)
}

fn arity(name: &str) -> BytesFrame {
    err(format!(
        "ERR wrong number of arguments for '{}' command",
        name.to_ascii_lowercase()
    ))
}

fn not_integer() -> BytesFrame {
    err("ERR value is not an integer or out of range")
}

fn syntax() -> BytesFrame {
    err("ERR syntax error")
}

fn upper(b: &[u8]) -> String {
    String::from_utf8_lossy(b).to_ascii_uppercase()
}

fn parse_int(b: &[u8]) -> Option<i64> {
    std::str::from_utf8(b).ok()?.parse().ok()
}

/// The reply of a write path or read error.
fn status_reply(s: &Status) -> BytesFrame {
    let m = s.message();
    match s.code() {
        Code::FailedPrecondition if m.contains("not a decimal 64-bit integer") => not_integer(),
        Code::FailedPrecondition if m.contains("overflows") => {
            err("ERR increment or decrement would overflow")
        }
        Code::FailedPrecondition if m.contains("read-only replica") => err(READONLY),
        // Committed on the master, fewer slaves than asked hold it: retrying
        // would apply it twice.
        Code::DeadlineExceeded => err(format!("NOREPLICAS {m}")),
        _ => err(format!("ERR {m}")),
    }
}

/// The reply of a queued write once it is answered; a write fewer slaves
/// than the master's `sync.min_replicas` acknowledged in time is committed
/// but answered `-NOREPLICAS` (retrying would apply it twice).
async fn settle_write(
    pending: PendingWrite,
    finish: impl FnOnce(&WriteOutcome) -> BytesFrame,
) -> BytesFrame {
    match pending.await {
        Ok(out) if out.replicas.short() => status_reply(&replicas_short(&out)),
        Ok(out) => finish(&out),
        Err(s) => status_reply(&s),
    }
}

/// How a command's reply is made from the outcomes of its ops, which it
/// consumes in order.
#[derive(Clone, Debug)]
enum Finish {
    /// `+OK` (one outcome per op: `n`).
    Ok(usize),
    /// SET NX/XX: `+OK`, or nil when it did not apply.
    OkIf,
    /// SET ... GET: the old value (a Get then the put).
    OldValue,
    /// INCR and friends.
    Int,
    /// APPEND: the new length.
    Len,
    /// GET.
    Value,
    /// STRLEN.
    Strlen,
    /// EXISTS: how many of `n` Gets found a value.
    Present(usize),
    /// DEL: `n` pairs of (Get, Delete): how many keys existed.
    Deleted(usize),
    /// MGET: `n` values.
    Values(usize),
}

impl Finish {
    fn outcomes(&self) -> usize {
        match self {
            Finish::Ok(n) | Finish::Present(n) | Finish::Values(n) => *n,
            Finish::Deleted(n) => 2 * n,
            Finish::OldValue => 2,
            _ => 1,
        }
    }

    fn reply(&self, out: &[OpOutcome]) -> BytesFrame {
        let value = |o: &OpOutcome| match o {
            OpOutcome::Value(Some(v)) => bulk(v.clone()),
            _ => BytesFrame::Null,
        };
        let found = |o: &OpOutcome| matches!(o, OpOutcome::Value(Some(_)));
        match (self, out) {
            (Finish::Ok(_), _) => ok(),
            (Finish::OkIf, [OpOutcome::PutIf(true)]) => ok(),
            (Finish::OkIf, _) => BytesFrame::Null,
            (Finish::OldValue, [old, _]) => value(old),
            (Finish::Int, [OpOutcome::IncrBy(v)]) => int(*v),
            (Finish::Len, [OpOutcome::Append(l)]) => int(*l as i64),
            (Finish::Value, [o]) => value(o),
            (Finish::Strlen, [OpOutcome::Value(v)]) => {
                int(v.as_ref().map_or(0, |v| v.len()) as i64)
            }
            (Finish::Present(_), outs) => int(outs.iter().filter(|o| found(o)).count() as i64),
            (Finish::Deleted(_), outs) => {
                int(outs.iter().step_by(2).filter(|o| found(o)).count() as i64)
            }
            (Finish::Values(_), outs) => BytesFrame::Array(outs.iter().map(value).collect()),
            (f, o) => err(format!("ERR internal: {f:?} got {o:?}")),
        }
    }
}

/// A data command as tern ops.
struct Plan {
    ops: Vec<WriteOp>,
    finish: Finish,
}

impl Plan {
    fn reads_only(&self) -> bool {
        self.ops.iter().all(|o| matches!(o, WriteOp::Get { .. }))
    }
}

fn key(b: &Bytes) -> Result<Bytes, BytesFrame> {
    limits::check_key(b).map_err(|e| err(format!("ERR {e}")))?;
    Ok(b.clone())
}

fn value(b: &Bytes) -> Result<Bytes, BytesFrame> {
    limits::check_value(b).map_err(|e| err(format!("ERR {e}")))?;
    Ok(b.clone())
}

fn get(k: &Bytes) -> Result<WriteOp, BytesFrame> {
    Ok(WriteOp::Get { key: key(k)? })
}

/// Plans a data command; `Ok(None)`: not a data command.
fn plan(name: &str, args: &[Bytes]) -> Result<Option<Plan>, BytesFrame> {
    let n = args.len();
    let need = |ok: bool| if ok { Ok(()) } else { Err(arity(name)) };
    let plan = match name {
        "GET" => {
            need(n == 2)?;
            Plan {
                ops: vec![get(&args[1])?],
                finish: Finish::Value,
            }
        }
        "STRLEN" => {
            need(n == 2)?;
            Plan {
                ops: vec![get(&args[1])?],
                finish: Finish::Strlen,
            }
        }
        "MGET" | "EXISTS" => {
            need(n >= 2)?;
            let ops = args[1..].iter().map(get).collect::<Result<Vec<_>, _>>()?;
            let finish = if name == "MGET" {
                Finish::Values(ops.len())
            } else {
                Finish::Present(ops.len())
            };
            Plan { ops, finish }
        }
        "SET" => {
            need(n >= 3)?;
            let (k, v) = (key(&args[1])?, value(&args[2])?);
            let (mut cond, mut old) = (None, false);
            for opt in &args[3..] {
                match upper(opt).as_str() {
                    "NX" if cond.is_none() => cond = Some(false),
                    "XX" if cond.is_none() => cond = Some(true),
                    "GET" => old = true,
                    "EX" | "PX" | "EXAT" | "PXAT" | "KEEPTTL" => {
                        return Err(err(format!(
                            "ERR tern has no TTLs: SET ... {} is not supported (keys never expire)",
                            upper(opt)
                        )));
                    }
                    _ => return Err(syntax()),
                }
            }
            let put = match cond {
                Some(exists) => WriteOp::PutIf {
                    key: k.clone(),
                    value: v,
                    exists,
                },
                None => WriteOp::Put {
                    key: k.clone(),
                    value: v,
                },
            };
            match (old, cond) {
                (true, _) => Plan {
                    ops: vec![WriteOp::Get { key: k }, put],
                    finish: Finish::OldValue,
                },
                (false, Some(_)) => Plan {
                    ops: vec![put],
                    finish: Finish::OkIf,
                },
                (false, None) => Plan {
                    ops: vec![put],
                    finish: Finish::Ok(1),
                },
            }
        }
        "MSET" => {
            need(n >= 3 && n % 2 == 1)?;
            let ops = args[1..]
                .chunks(2)
                .map(|kv| {
                    Ok(WriteOp::Put {
                        key: key(&kv[0])?,
                        value: value(&kv[1])?,
                    })
                })
                .collect::<Result<Vec<_>, BytesFrame>>()?;
            Plan {
                finish: Finish::Ok(ops.len()),
                ops,
            }
        }
        "DEL" | "UNLINK" => {
            need(n >= 2)?;
            let mut ops = Vec::with_capacity(2 * (n - 1));
            for k in &args[1..] {
                let k = key(k)?;
                ops.push(WriteOp::Get { key: k.clone() });
                ops.push(WriteOp::Delete { key: k });
            }
            Plan {
                ops,
                finish: Finish::Deleted(n - 1),
            }
        }
        "INCR" | "DECR" | "INCRBY" | "DECRBY" => {
            let by = name.ends_with("BY");
            need(n == if by { 3 } else { 2 })?;
            let delta = if by {
                parse_int(&args[2]).ok_or_else(not_integer)?
            } else {
                1
            };
            let delta = if name.starts_with("DECR") {
                delta
                    .checked_neg()
                    .ok_or_else(|| err("ERR decrement would overflow"))?
            } else {
                delta
            };
            Plan {
                ops: vec![WriteOp::IncrBy {
                    key: key(&args[1])?,
                    delta,
                }],
                finish: Finish::Int,
            }
        }
        "APPEND" => {
            need(n == 3)?;
            Plan {
                ops: vec![WriteOp::Append {
                    key: key(&args[1])?,
                    value: value(&args[2])?,
                }],
                finish: Finish::Len,
            }
        }
        _ => return Ok(None),
    };
    Ok(Some(plan))
}

/// Commands that may be queued in MULTI besides the data commands.
fn queueable(name: &str) -> bool {
    matches!(name, "PING" | "ECHO")
}

/// The name and arity of every command, for COMMAND (arity as Redis
/// counts it: negative = at least).
pub(super) const COMMANDS: &[(&str, i64, &str)] = &[
    ("get", 2, "readonly"),
    ("set", -3, "write"),
    ("del", -2, "write"),
    ("unlink", -2, "write"),
    ("exists", -2, "readonly"),
    ("mget", -2, "readonly"),
    ("mset", -3, "write"),
    ("incr", 2, "write"),
    ("incrby", 3, "write"),
    ("decr", 2, "write"),
    ("decrby", 3, "write"),
    ("append", 3, "write"),
    ("strlen", 2, "readonly"),
    ("type", 2, "readonly"),
    ("scan", -2, "readonly"),
    ("dbsize", 1, "readonly"),
    ("multi", 1, "fast"),
    ("exec", 1, "write"),
    ("discard", 1, "fast"),
    ("watch", -2, "fast"),
    ("unwatch", 1, "fast"),
    ("ping", -1, "fast"),
    ("echo", 2, "fast"),
    ("hello", -1, "fast"),
    ("auth", -2, "fast"),
    ("select", 2, "fast"),
    ("quit", -1, "fast"),
    ("client", -2, "admin"),
    ("command", -1, "admin"),
    ("config", -2, "admin"),
    ("info", -1, "admin"),
    ("role", 1, "admin"),
    ("wait", 3, "admin"),
];

fn command_entry(&(name, arity, flag): &(&'static str, i64, &'static str)) -> BytesFrame {
    let (first, last) = match name {
        "mset" => (1, -1),
        "get" | "set" | "incr" | "incrby" | "decr" | "decrby" | "append" | "strlen" | "type" => {
            (1, 1)
        }
        "del" | "unlink" | "exists" | "mget" => (1, -1),
        _ => (0, 0),
    };
    let step = if name == "mset" {
        2
    } else {
        i64::from(first != 0)
    };
    BytesFrame::Array(vec![
        bulk(name),
        int(arity),
        BytesFrame::Array(vec![BytesFrame::SimpleString(Bytes::from(flag))]),
        int(first),
        int(last),
        int(step),
    ])
}

impl Connection<'_> {
    /// Runs one command (its reply is queued in order).
    pub(super) async fn command(&mut self, args: Vec<Bytes>) {
        let name = upper(&args[0]);
        if !self.authed && !matches!(name.as_str(), "AUTH" | "HELLO" | "QUIT") {
            self.reply(err("NOAUTH Authentication required."));
            return;
        }
        if let Some(queued) = &mut self.multi
            && !matches!(
                name.as_str(),
                "EXEC" | "DISCARD" | "MULTI" | "WATCH" | "QUIT"
            )
        {
            let checked = match plan(&name, &args) {
                Ok(Some(_)) => Ok(()),
                Ok(None) if queueable(&name) => Ok(()),
                Ok(None) if COMMANDS.iter().any(|c| c.0.eq_ignore_ascii_case(&name)) => {
                    Err(err(format!(
                        "ERR '{}' is not supported inside MULTI",
                        name.to_ascii_lowercase()
                    )))
                }
                Ok(None) => Err(unknown(&args)),
                Err(e) => Err(e),
            };
            match checked {
                Ok(()) => {
                    queued.push(args);
                    self.reply(BytesFrame::SimpleString(Bytes::from_static(b"QUEUED")));
                }
                Err(e) => {
                    self.multi_failed = true;
                    self.reply(e);
                }
            }
            return;
        }
        match plan(&name, &args) {
            Err(e) => return self.reply(e),
            Ok(Some(p)) => return self.run_plan(p).await,
            Ok(None) => {}
        }
        let n = args.len();
        let reply = match name.as_str() {
            "PING" => match n {
                1 => BytesFrame::SimpleString(Bytes::from_static(b"PONG")),
                2 => bulk(args[1].clone()),
                _ => arity(&name),
            },
            "ECHO" if n == 2 => bulk(args[1].clone()),
            "QUIT" => {
                self.closing = true;
                ok()
            }
            "SELECT" if n == 2 => match parse_int(&args[1]) {
                Some(0) => ok(),
                Some(_) => err("ERR DB index is out of range"),
                None => not_integer(),
            },
            "AUTH" if n == 2 || n == 3 => self.auth(&args[1..]),
            "HELLO" => self.hello(&args[1..]),
            "CLIENT" if n >= 2 => self.client(&args[1..]),
            "COMMAND" => command(&args[1..]),
            "CONFIG" if n == 3 && upper(&args[1]) == "GET" => self.config_get(&args[2]),
            "TYPE" if n == 2 => match self
                .read(vec![WriteOp::Get {
                    key: args[1].clone(),
                }])
                .await
            {
                Ok(outs) => BytesFrame::SimpleString(Bytes::from_static(
                    if matches!(outs.first(), Some(OpOutcome::Value(Some(_)))) {
                        b"string"
                    } else {
                        b"none"
                    },
                )),
                Err(e) => e,
            },
            "MULTI" if n == 1 => {
                if self.multi.is_some() {
                    err("ERR MULTI calls can not be nested")
                } else {
                    self.multi = Some(Vec::new());
                    self.multi_failed = false;
                    ok()
                }
            }
            "EXEC" if n == 1 => return self.exec().await,
            "DISCARD" if n == 1 => {
                if self.multi.take().is_some() {
                    ok()
                } else {
                    err("ERR DISCARD without MULTI")
                }
            }
            "WATCH" => err(
                "ERR WATCH is not supported: tern runs MULTI/EXEC as one transaction on the \
                 master; use it without WATCH",
            ),
            "UNWATCH" if n == 1 => ok(),
            "SCAN" if n >= 2 => self.scan(&args[1..]).await,
            "DBSIZE" if n == 1 => self.dbsize().await,
            "INFO" => self.info(&args[1..]).await,
            "ROLE" if n == 1 => info::role(&self.shared.node.info.info()),
            "WAIT" if n == 3 => return self.wait(&args[1], &args[2]).await,
            "ECHO" | "SELECT" | "AUTH" | "CLIENT" | "TYPE" | "MULTI" | "EXEC" | "DISCARD"
            | "UNWATCH" | "SCAN" | "DBSIZE" | "ROLE" | "WAIT" | "CONFIG" => arity(&name),
            _ => unknown(&args),
        };
        self.reply(reply);
    }

    /// Reads (after this connection's queued writes) or queues a write.
    async fn run_plan(&mut self, p: Plan) {
        if p.reads_only() {
            let reply = match self.read(p.ops).await {
                Ok(outs) => p.finish.reply(&outs),
                Err(e) => e,
            };
            self.reply(reply);
        } else {
            let finish = p.finish;
            self.write(p.ops, move |out| finish.reply(&out.results))
                .await;
        }
    }

    /// Runs Get ops against RocksDB, after the connection's queued writes
    /// (so a client reads its own writes) and the read floor.
    async fn read(&mut self, ops: Vec<WriteOp>) -> Result<Vec<OpOutcome>, BytesFrame> {
        self.settle_all().await;
        let kv = &self.shared.node.kv;
        kv.note_read(self.writer);
        kv.reads_ready().await.map_err(|s| status_reply(&s))?;
        ops.iter()
            .map(|op| match op {
                WriteOp::Get { key } => kv
                    .state()
                    .get(key)
                    .map(|v| OpOutcome::Value(v.map(Bytes::from)))
                    .map_err(|e| err(format!("ERR {e}"))),
                other => Err(err(format!("ERR internal: {other:?} is not a read"))),
            })
            .collect()
    }

    /// Queues a write on the write path; its reply comes when it commits.
    async fn write(
        &mut self,
        ops: Vec<WriteOp>,
        finish: impl FnOnce(&WriteOutcome) -> BytesFrame + Send + 'static,
    ) {
        let writer = match self.shared.node.kv.writer() {
            Ok(w) => w.clone(),
            Err(_) => return self.reply(err(READONLY)),
        };
        // Bound the writes in flight on this connection.
        self.settle(super::MAX_IN_FLIGHT - 1).await;
        // The only command in hand, with no answer owed before it: it is
        // submitted alone.
        let alone = (self.last_received && self.queue.is_empty()).then_some(self.writer);
        match writer.submit(ops, WriteOptions::default(), alone).await {
            Ok(pending) => self
                .queue
                .push_back(Queued::Write(Box::pin(settle_write(pending, finish)))),
            Err(s) => self.reply(status_reply(&s)),
        }
    }

    /// EXEC: the queued commands as one transaction.
    async fn exec(&mut self) {
        let Some(queued) = self.multi.take() else {
            return self.reply(err("ERR EXEC without MULTI"));
        };
        if std::mem::take(&mut self.multi_failed) {
            return self.reply(err(
                "EXECABORT Transaction discarded because of previous errors.",
            ));
        }
        // Each command's ops, and how to answer it from its outcomes (or its
        // fixed reply: PING, ECHO).
        let mut ops = Vec::new();
        let mut parts: Vec<Result<Finish, BytesFrame>> = Vec::new();
        for args in &queued {
            let name = upper(&args[0]);
            match plan(&name, args) {
                Ok(Some(p)) => {
                    ops.extend(p.ops);
                    parts.push(Ok(p.finish));
                }
                _ if name == "PING" => parts.push(Err(if args.len() > 1 {
                    bulk(args[1].clone())
                } else {
                    BytesFrame::SimpleString(Bytes::from_static(b"PONG"))
                })),
                _ if name == "ECHO" && args.len() == 2 => parts.push(Err(bulk(args[1].clone()))),
                _ => parts.push(Err(err("ERR internal: unplannable queued command"))),
            }
        }
        let build = move |outs: &[OpOutcome]| {
            let mut at = 0;
            let replies = parts
                .iter()
                .map(|p| match p {
                    Ok(f) => {
                        let n = f.outcomes();
                        let r = f.reply(outs.get(at..at + n).unwrap_or_default());
                        at += n;
                        r
                    }
                    Err(fixed) => fixed.clone(),
                })
                .collect();
            BytesFrame::Array(replies)
        };
        if ops.is_empty() {
            return self.reply(build(&[]));
        }
        if ops.iter().all(|o| matches!(o, WriteOp::Get { .. }))
            && self.shared.node.kv.writer().is_err()
        {
            // Reads only on a slave: read them now (one after the other).
            let reply = match self.read(ops).await {
                Ok(outs) => build(&outs),
                Err(e) => e,
            };
            return self.reply(reply);
        }
        self.write(ops, move |out| build(&out.results)).await;
    }

    /// CONFIG GET: the persistence settings tools print (redis-benchmark
    /// asks for `save` and `appendonly`), as tern has them: no snapshots,
    /// an append-only log fsynced as `binlog.fsync` says. Other names: none.
    fn config_get(&self, pattern: &Bytes) -> BytesFrame {
        let fsync = self.shared.node.info.info().fsync;
        let settings = [
            ("save", String::new()),
            ("appendonly", "yes".into()),
            ("appendfsync", fsync),
        ];
        BytesFrame::Array(
            settings
                .into_iter()
                .filter(|(name, _)| {
                    super::glob::matches(&pattern.to_ascii_lowercase(), name.as_bytes())
                })
                .flat_map(|(name, value)| [bulk(name), bulk(value)])
                .collect(),
        )
    }

    fn auth(&mut self, args: &[Bytes]) -> BytesFrame {
        let auth = &self.shared.node.auth;
        if !auth.client_token_required() {
            return err(
                "ERR AUTH <password> called without any password configured for the default \
                 user. Are you sure your configuration is correct?",
            );
        }
        let (user, token) = match args {
            [token] => (None, token),
            [user, token] => (Some(user), token),
            _ => return arity("AUTH"),
        };
        if user.is_some_and(|u| u.as_ref() != b"default") {
            // tern has one user: the client token's.
            auth.count_failure();
            return err("WRONGPASS invalid username-password pair or user is disabled.");
        }
        if !auth.check_client_token(token) {
            return err("WRONGPASS invalid username-password pair or user is disabled.");
        }
        self.authed = true;
        ok()
    }

    /// HELLO [protover [AUTH user pass] [SETNAME name]]: RESP2 only.
    fn hello(&mut self, args: &[Bytes]) -> BytesFrame {
        let mut i = 0;
        if let Some(v) = args.first() {
            match parse_int(v) {
                Some(2) => {}
                Some(3) => {
                    return err("NOPROTO sorry, this protocol version is not supported");
                }
                _ => return err("NOPROTO unsupported protocol version"),
            }
            i = 1;
        }
        while i < args.len() {
            match upper(&args[i]).as_str() {
                "AUTH" if i + 2 < args.len() => {
                    let r = self.auth(&args[i + 1..i + 3]);
                    if matches!(r, BytesFrame::Error(_)) {
                        return r;
                    }
                    i += 3;
                }
                "SETNAME" if i + 1 < args.len() => {
                    self.name = Some(args[i + 1].clone());
                    i += 2;
                }
                _ => return syntax(),
            }
        }
        if !self.authed {
            return err(
                "NOAUTH HELLO must be called with the client already authenticated, otherwise the HELLO <proto> AUTH <user> <pass> option can be used to authenticate the client and select the RESP protocol version at the same time",
            );
        }
        let role = self.shared.node.info.info().role;
        BytesFrame::Array(vec![
            bulk("server"),
            bulk("tern"),
            bulk("version"),
            bulk(env!("CARGO_PKG_VERSION")),
            bulk("proto"),
            int(2),
            bulk("id"),
            int(self.id as i64),
            bulk("mode"),
            bulk("standalone"),
            bulk("role"),
            bulk(role),
            bulk("modules"),
            BytesFrame::Array(Vec::new()),
        ])
    }

    fn client(&mut self, args: &[Bytes]) -> BytesFrame {
        match (upper(&args[0]).as_str(), args.len()) {
            ("SETNAME", 2) => {
                if args[1].iter().any(|b| *b <= b' ' || *b > b'~') {
                    return err(
                        "ERR Client names cannot contain spaces, newlines or special characters.",
                    );
                }
                self.name = (!args[1].is_empty()).then(|| args[1].clone());
                ok()
            }
            ("GETNAME", 1) => self.name.clone().map_or(BytesFrame::Null, bulk),
            ("ID", 1) => int(self.id as i64),
            ("SETINFO", 3) => ok(),
            ("INFO", 1) => bulk(format!(
                "id={} addr={} name={} db=0\n",
                self.id,
                self.peer,
                self.name
                    .as_deref()
                    .map(String::from_utf8_lossy)
                    .unwrap_or_default()
            )),
            (sub, _) => err(format!(
                "ERR unknown subcommand or wrong number of arguments for '{}'. Try CLIENT HELP.",
                sub.to_ascii_lowercase()
            )),
        }
    }

    /// SCAN cursor [MATCH pattern] [COUNT n] [TYPE t]: `count` keys looked
    /// at per call, those matching returned; the cursor names where the next
    /// call starts (0: from the beginning, and the end).
    async fn scan(&mut self, args: &[Bytes]) -> BytesFrame {
        let Some(cursor) = std::str::from_utf8(&args[0])
            .ok()
            .and_then(|c| c.parse::<u64>().ok())
        else {
            return err("ERR invalid cursor");
        };
        let (mut pattern, mut count, mut strings) = (None, SCAN_COUNT, true);
        let mut i = 1;
        while i < args.len() {
            let Some(v) = args.get(i + 1) else {
                return syntax();
            };
            match upper(&args[i]).as_str() {
                "MATCH" => pattern = Some(v.clone()),
                "COUNT" => match parse_int(v) {
                    Some(c) if c >= 1 => count = (c as usize).min(MAX_SCAN_COUNT),
                    Some(_) => return syntax(),
                    None => return not_integer(),
                },
                "TYPE" => strings = v.eq_ignore_ascii_case(b"string"),
                _ => return syntax(),
            }
            i += 2;
        }
        let start = if cursor == 0 {
            Bytes::new()
        } else {
            let cursors = self
                .shared
                .cursors
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            match cursors.get(cursor) {
                Some(k) => k,
                None => return err("ERR invalid cursor"),
            }
        };
        self.settle_all().await;
        let kv = &self.shared.node.kv;
        if let Err(s) = kv.reads_ready().await {
            return status_reply(&s);
        }
        let state = kv.state().clone();
        let scanned = tokio::task::spawn_blocking(move || {
            state.scan(&start, &[], count, limits::MAX_SCAN_BYTES)
        })
        .await;
        let (items, _, more) = match scanned {
            Ok(Ok(x)) => x,
            Ok(Err(e)) => return err(format!("ERR {e}")),
            Err(e) => return err(format!("ERR {e}")),
        };
        let next = match (more, items.last()) {
            (true, Some((last, _))) => {
                let mut after = last.clone();
                after.push(0);
                self.shared
                    .cursors
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(Bytes::from(after))
            }
            _ => 0,
        };
        let keys = items
            .into_iter()
            .filter(|(k, _)| strings && pattern.as_ref().is_none_or(|p| super::glob::matches(p, k)))
            .map(|(k, _)| bulk(k))
            .collect();
        BytesFrame::Array(vec![bulk(next.to_string()), BytesFrame::Array(keys)])
    }

    async fn dbsize(&mut self) -> BytesFrame {
        self.settle_all().await;
        let state = self.shared.node.kv.state().clone();
        match tokio::task::spawn_blocking(move || state.count_keys()).await {
            Ok(Ok(n)) => int(n as i64),
            Ok(Err(e)) => err(format!("ERR {e}")),
            Err(e) => err(format!("ERR {e}")),
        }
    }

    async fn info(&mut self, args: &[Bytes]) -> BytesFrame {
        let asked: Vec<String> = args
            .iter()
            .map(|a| String::from_utf8_lossy(a).to_ascii_lowercase())
            .collect();
        let keys = if info::wants_keyspace(&asked) {
            let state = self.shared.node.kv.state().clone();
            tokio::task::spawn_blocking(move || state.count_keys())
                .await
                .ok()
                .and_then(Result::ok)
        } else {
            None
        };
        let shared = self.shared;
        let extra = info::Extra {
            tcp_port: shared.port,
            uptime_secs: shared.started.elapsed().as_secs(),
            connected_clients: shared.open.load(Ordering::Relaxed),
            total_connections: shared.total_connections.load(Ordering::Relaxed),
            total_commands: shared.total_commands.load(Ordering::Relaxed),
            keys,
        };
        bulk(info::render(&shared.node.info.info(), &extra, &asked))
    }

    /// WAIT numreplicas timeout: the master's Admin.Wait on its last index
    /// (timeout 0: the master's `sync.replica_timeout_ms`; tern never waits
    /// for ever).
    async fn wait(&mut self, replicas: &Bytes, timeout: &Bytes) {
        let (Some(replicas), Some(timeout)) = (parse_int(replicas), parse_int(timeout)) else {
            return self.reply(not_integer());
        };
        if replicas < 0 || timeout < 0 {
            return self.reply(err("ERR timeout is negative"));
        }
        // After this connection's own writes.
        self.settle_all().await;
        let req = admin::WaitRequest {
            index: 0,
            replicas: u32::try_from(replicas).unwrap_or(u32::MAX),
            timeout_ms: u32::try_from(timeout).unwrap_or(u32::MAX),
        };
        let reply = match self.shared.node.control.wait(req).await {
            Ok(r) => int(i64::from(r.acked)),
            Err(s) if s.code() == Code::FailedPrecondition => err(
                "ERR WAIT cannot be used with replica instances. Please also note that since Redis 4.0 if a replica is configured to be writable (which is not the default) writes to replicas are just local and are not propagated.",
            ),
            Err(s) => status_reply(&s),
        };
        self.reply(reply);
    }
}

/// Redis's answer to a command it does not know.
fn unknown(args: &[Bytes]) -> BytesFrame {
    let mut msg = format!(
        "ERR unknown command '{}', with args beginning with: ",
        String::from_utf8_lossy(&args[0])
            .chars()
            .take(128)
            .collect::<String>()
    );
    for a in args.iter().skip(1).take(8) {
        let a: String = String::from_utf8_lossy(a).chars().take(64).collect();
        msg.push_str(&format!("'{a}' "));
    }
    err(msg)
}

/// COMMAND, COMMAND COUNT, COMMAND DOCS, COMMAND INFO name...
fn command(args: &[Bytes]) -> BytesFrame {
    match args.first().map(|a| upper(a)).as_deref() {
        None => BytesFrame::Array(COMMANDS.iter().map(command_entry).collect()),
        Some("COUNT") => int(COMMANDS.len() as i64),
        // redis-cli asks for the docs to show hints; it does without them.
        Some("DOCS") => BytesFrame::Array(Vec::new()),
        Some("INFO") => BytesFrame::Array(
            args[1..]
                .iter()
                .map(|n| {
                    let n = String::from_utf8_lossy(n).to_ascii_lowercase();
                    COMMANDS
                        .iter()
                        .find(|c| c.0 == n)
                        .map_or(BytesFrame::Null, command_entry)
                })
                .collect(),
        ),
        Some(sub) => err(format!(
            "ERR unknown subcommand '{}'. Try COMMAND HELP.",
            sub.to_ascii_lowercase()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(s: &str) -> Bytes {
        Bytes::from(s.to_string())
    }

    fn args(s: &str) -> Vec<Bytes> {
        s.split(' ').map(b).collect()
    }

    #[test]
    fn plans_and_replies() {
        let p = plan("SET", &args("SET k v NX")).unwrap().unwrap();
        assert!(matches!(p.ops[..], [WriteOp::PutIf { exists: false, .. }]));
        assert_eq!(p.finish.reply(&[OpOutcome::PutIf(false)]), BytesFrame::Null);
        assert_eq!(p.finish.reply(&[OpOutcome::PutIf(true)]), ok());
        let p = plan("DEL", &args("DEL a b")).unwrap().unwrap();
        let outs = [
            OpOutcome::Value(Some(b("1"))),
            OpOutcome::Delete,
            OpOutcome::Value(None),
            OpOutcome::Delete,
        ];
        assert_eq!(p.finish.reply(&outs), int(1));
        assert!(plan("GET", &args("GET k")).unwrap().unwrap().reads_only());
        assert!(matches!(
            plan("SET", &args("SET k v EX 10")),
            Err(BytesFrame::Error(e)) if e.contains("no TTLs")
        ));
        assert!(
            matches!(plan("MSET", &args("MSET a 1 b")), Err(BytesFrame::Error(e)) if e.contains("wrong number"))
        );
        assert!(matches!(plan("INCRBY", &args("INCRBY k x")), Err(e) if e == not_integer()));
        assert!(plan("DECRBY", &args("DECRBY k -9223372036854775808")).is_err());
        assert!(plan("PING", &args("PING")).unwrap().is_none());
    }

    #[test]
    fn write_errors_speak_redis() {
        let s = Status::failed_precondition("value at key \"k\" is not a decimal 64-bit integer");
        assert_eq!(status_reply(&s), not_integer());
        let s = Status::deadline_exceeded("committed on the master at index 5; 0 of 1 ...");
        assert!(
            matches!(status_reply(&s), BytesFrame::Error(e) if e.starts_with("NOREPLICAS committed"))
        );
    }
}
