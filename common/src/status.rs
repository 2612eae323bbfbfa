//! The gRPC status a peer gets for bad input, in one place.
//!
//! - A [`WireError`] (a message that decoded but is not valid) is
//!   INVALID_ARGUMENT, or OUT_OF_RANGE for positions that contradict each other.
//! - A message tonic could not take: over the decoding limit is
//!   RESOURCE_EXHAUSTED (tonic itself says OUT_OF_RANGE "Error, decoded message
//!   length too large"), undecodable is INVALID_ARGUMENT (tonic says INTERNAL,
//!   from prost's "failed to decode Protobuf message", a bad compression flag,
//!   or a stream that ends inside a message). See [`inbound`].
//! - A limit of the node (too many sessions, a snapshot made too recently) is
//!   RESOURCE_EXHAUSTED with when to retry ([`exhausted`]).

use std::time::Duration;

use tonic::{Code, Status};

use crate::wire::WireError;

/// The status for a message that decoded but is not valid.
pub fn from_wire(e: &WireError) -> Status {
    match e {
        WireError::Positions(_) => Status::out_of_range(e.to_string()),
        WireError::BadLength { .. }
        | WireError::TooLong { .. }
        | WireError::TooMany { .. }
        | WireError::BadReplId(_)
        | WireError::Empty(_)
        | WireError::Invalid(_) => Status::invalid_argument(e.to_string()),
    }
}

impl From<WireError> for Status {
    fn from(e: WireError) -> Status {
        from_wire(&e)
    }
}

/// What an error reading a request stream was.
#[derive(Debug)]
pub enum Inbound {
    /// The peer sent a message the server cannot take: the call ends with
    /// this status.
    Refused(Status),
    /// The connection or the stream went away (reset, cancelled, timeout):
    /// there is nobody to answer.
    Gone(Status),
}

/// Classifies an error from `Streaming::message()` (or tonic's answer to an
/// unary request it could not decode) and gives the status the peer gets.
pub fn inbound(s: Status) -> Inbound {
    let msg = s.message();
    match s.code() {
        Code::OutOfRange if msg.starts_with("Error, decoded message length too large") => {
            Inbound::Refused(Status::resource_exhausted(msg.to_string()))
        }
        Code::ResourceExhausted if msg.starts_with("Error decompressing") => Inbound::Refused(s),
        Code::Internal
            if msg.starts_with("failed to decode Protobuf message")
                || msg.starts_with("protocol error: received message")
                || msg.starts_with("Error decompressing")
                || msg.starts_with("Unexpected EOF decoding stream") =>
        {
            Inbound::Refused(Status::invalid_argument(msg.to_string()))
        }
        _ => Inbound::Gone(s),
    }
}

/// Rewrites the status of a trailers-only answer tonic produced for a request
/// it could not decode (see [`inbound`]); other answers are left alone. For a
/// tower `MapResponse` layer in front of every service.
pub fn remap_response_headers(headers: &mut http::HeaderMap) {
    let Some(code) = headers
        .get(Status::GRPC_STATUS)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
    else {
        return;
    };
    if code != Code::OutOfRange as i32 && code != Code::Internal as i32 {
        return;
    }
    let message = headers
        .get("grpc-message")
        .and_then(|v| v.to_str().ok())
        .map(percent_decode)
        .unwrap_or_default();
    if let Inbound::Refused(s) = inbound(Status::new(Code::from_i32(code), message)) {
        headers.insert(
            Status::GRPC_STATUS,
            http::HeaderValue::from(s.code() as i32),
        );
    }
}

/// [`remap_response_headers`] on a whole response: for a
/// `tower::util::MapResponseLayer` in front of every service of the port, so
/// a request tonic could not decode gets the same codes on every service.
pub fn remap_decode_failures<B>(mut resp: http::Response<B>) -> http::Response<B> {
    remap_response_headers(resp.headers_mut());
    resp
}

/// grpc-message is percent-encoded; only the prefix matters here.
fn percent_decode(m: &str) -> String {
    let b = m.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let Some(Ok(v)) = m.get(i + 1..i + 3).map(|h| u8::from_str_radix(h, 16))
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// RESOURCE_EXHAUSTED for a limit of the node, saying when to retry.
pub fn exhausted(what: impl std::fmt::Display, retry_after: Duration) -> Status {
    Status::resource_exhausted(format!(
        "{what}; retry in {} ms",
        retry_after.as_millis().max(1)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tonic_decode_errors_get_their_codes() {
        let over = Status::out_of_range(
            "Error, decoded message length too large: found 5000000 bytes, the limit is: 4194304 bytes",
        );
        match inbound(over) {
            Inbound::Refused(s) => assert_eq!(s.code(), Code::ResourceExhausted),
            o => panic!("{o:?}"),
        }
        let bad = Status::internal("failed to decode Protobuf message: invalid wire type");
        match inbound(bad) {
            Inbound::Refused(s) => assert_eq!(s.code(), Code::InvalidArgument),
            o => panic!("{o:?}"),
        }
        assert!(matches!(
            inbound(Status::cancelled("h2 protocol error")),
            Inbound::Gone(_)
        ));
        assert!(matches!(
            inbound(Status::out_of_range("index beyond")),
            Inbound::Gone(_)
        ));
    }

    #[test]
    fn trailers_only_answers_are_remapped() {
        let mut h = http::HeaderMap::new();
        h.insert(Status::GRPC_STATUS, http::HeaderValue::from(11));
        h.insert(
            "grpc-message",
            http::HeaderValue::from_static(
                "Error,%20decoded%20message%20length%20too%20large:%20found%209%20bytes",
            ),
        );
        remap_response_headers(&mut h);
        assert_eq!(h.get(Status::GRPC_STATUS).unwrap(), "8");
        let mut h = http::HeaderMap::new();
        h.insert(Status::GRPC_STATUS, http::HeaderValue::from(11));
        h.insert("grpc-message", http::HeaderValue::from_static("other"));
        remap_response_headers(&mut h);
        assert_eq!(h.get(Status::GRPC_STATUS).unwrap(), "11");
    }
}
