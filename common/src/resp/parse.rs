//! Requests of the RESP front: a bounded decoder for what clients send.
//!
//! A client sends each command as a RESP2 array of bulk strings
//! (`*<n>\r\n$<len>\r\n<bytes>\r\n...`) or, typed by hand or by
//! `redis-benchmark`'s inline tests, as an inline command (a line of words).
//! Nothing else is a request, so the decoder accepts exactly these two forms
//! and bounds everything before it buffers or allocates: at most
//! [`MAX_ARGS`] arguments, each at most [`MAX_ARG_BYTES`], a whole command at
//! most [`MAX_COMMAND_BYTES`], an inline line at most [`MAX_INLINE_BYTES`].
//! A general RESP decoder (the `redis-protocol` crate, which encodes the
//! replies) recurses once per nested array and sizes arrays from their
//! header, so a hostile frame could exhaust the stack or the memory: requests
//! never go through it. Anything malformed is a [`ParseError`]: the
//! connection answers it and closes.

use bytes::{Buf, Bytes, BytesMut};

use crate::limits;

/// Most arguments in one command (Redis: 1024 * 1024).
pub const MAX_ARGS: usize = 1024 * 1024;
/// Largest argument: a value may be [`limits::MAX_VALUE_BYTES`].
pub const MAX_ARG_BYTES: usize = limits::MAX_VALUE_BYTES;
/// Largest command on the wire (as a gRPC message may be).
pub const MAX_COMMAND_BYTES: usize = limits::MAX_MESSAGE_BYTES;
/// Longest inline command line (Redis: 64 KiB).
pub const MAX_INLINE_BYTES: usize = 64 << 10;
/// Longest `*<n>` or `$<len>` header line, digits and sign included.
const MAX_HEADER_BYTES: usize = 32;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("Protocol error: expected '$', got '{0}'")]
    ExpectedBulk(char),
    #[error("Protocol error: invalid multibulk length")]
    BadArrayLen,
    #[error("Protocol error: invalid bulk length")]
    BadBulkLen,
    #[error("Protocol error: expected CRLF after a bulk string")]
    MissingCrlf,
    #[error("Protocol error: too big inline request")]
    InlineTooLong,
    #[error("Protocol error: unbalanced quotes in request")]
    UnbalancedQuotes,
    #[error("Protocol error: command of {0} bytes is over the {MAX_COMMAND_BYTES}-byte limit")]
    TooLarge(usize),
}

/// A multibulk command received in part: its argument count, the data span
/// of each argument checked so far, and where the next one starts.
type Partial = (usize, Vec<(usize, usize)>, usize);

/// Decodes the commands of one connection. It remembers how far it got in
/// an incomplete command, so a large command arriving in many reads is
/// scanned once, not once per read.
#[derive(Debug, Default)]
pub struct Decoder {
    /// A multibulk command whose first arguments are checked: its argument
    /// count, the spans found, and where the next argument starts.
    partial: Option<Partial>,
    /// Bytes of an inline line already searched for its newline.
    inline_seen: usize,
}

impl Decoder {
    /// Decodes the next complete command at the front of `buf`, consuming
    /// it. `Ok(None)`: more bytes are needed (nothing is consumed). An empty
    /// command (`*0`, an empty inline line) gives `Ok(Some(vec![]))`.
    pub fn next_command(&mut self, buf: &mut BytesMut) -> Result<Option<Vec<Bytes>>, ParseError> {
        match buf.first() {
            None => Ok(None),
            Some(b'*') => self.multibulk(buf),
            Some(_) => self.inline(buf),
        }
    }

    fn multibulk(&mut self, buf: &mut BytesMut) -> Result<Option<Vec<Bytes>>, ParseError> {
        let (n, mut spans, mut pos) = match self.partial.take() {
            Some(p) => p,
            None => {
                let Some((n, pos)) = header(buf, 0, ParseError::BadArrayLen)? else {
                    return Ok(None);
                };
                if n <= 0 {
                    // `*0` and `*-1`: nothing to run (Redis ignores them too).
                    buf.advance(pos);
                    return Ok(Some(Vec::new()));
                }
                let n = usize::try_from(n).map_err(|_| ParseError::BadArrayLen)?;
                if n > MAX_ARGS {
                    return Err(ParseError::BadArrayLen);
                }
                (n, Vec::new(), pos)
            }
        };
        // Check each argument is complete before taking any: nothing is
        // allocated beyond one span per argument received.
        while spans.len() < n {
            match self.argument(buf, pos)? {
                Some((start, end)) => {
                    spans.push((start, end));
                    pos = end + 2;
                }
                None => {
                    self.partial = Some((n, spans, pos));
                    return Ok(None);
                }
            }
        }
        let frame = buf.split_to(pos).freeze();
        Ok(Some(
            spans.into_iter().map(|(s, e)| frame.slice(s..e)).collect(),
        ))
    }

    /// The bulk string at `pos`: its data span, `None` when incomplete.
    fn argument(&self, buf: &[u8], pos: usize) -> Result<Option<(usize, usize)>, ParseError> {
        match buf.get(pos) {
            None => return Ok(None),
            Some(b'$') => {}
            Some(&c) => return Err(ParseError::ExpectedBulk(c as char)),
        }
        let Some((len, start)) = header(buf, pos, ParseError::BadBulkLen)? else {
            return Ok(None);
        };
        let len = usize::try_from(len).map_err(|_| ParseError::BadBulkLen)?;
        if len > MAX_ARG_BYTES {
            return Err(ParseError::BadBulkLen);
        }
        let end = start + len;
        if end > MAX_COMMAND_BYTES {
            return Err(ParseError::TooLarge(end));
        }
        if buf.len() < end + 2 {
            return Ok(None);
        }
        if &buf[end..end + 2] != b"\r\n" {
            return Err(ParseError::MissingCrlf);
        }
        Ok(Some((start, end)))
    }

    fn inline(&mut self, buf: &mut BytesMut) -> Result<Option<Vec<Bytes>>, ParseError> {
        let from = self.inline_seen.min(buf.len());
        let Some(end) = buf[from..]
            .iter()
            .take(MAX_INLINE_BYTES + 1 - from.min(MAX_INLINE_BYTES))
            .position(|&b| b == b'\n')
            .map(|p| from + p)
        else {
            self.inline_seen = buf.len();
            return if buf.len() > MAX_INLINE_BYTES {
                Err(ParseError::InlineTooLong)
            } else {
                Ok(None)
            };
        };
        self.inline_seen = 0;
        let line = buf.split_to(end + 1);
        let line = line.strip_suffix(b"\n").unwrap_or(&line);
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        split_inline(line).map(Some)
    }
}

/// Position of the first `\r\n` in `buf[from..]`, looking at most `max` bytes.
fn find_crlf(buf: &[u8], from: usize, max: usize) -> Option<usize> {
    let end = buf.len().min(from.saturating_add(max).saturating_add(2));
    buf.get(from..end)?
        .windows(2)
        .position(|w| w == b"\r\n")
        .map(|p| from + p)
}

/// A header line `<prefix><digits>\r\n` at `at`: `Ok(None)` when incomplete.
fn header(buf: &[u8], at: usize, bad: ParseError) -> Result<Option<(i64, usize)>, ParseError> {
    match find_crlf(buf, at + 1, MAX_HEADER_BYTES) {
        Some(end) => {
            let digits = std::str::from_utf8(&buf[at + 1..end]).map_err(|_| bad.clone())?;
            let n: i64 = digits.parse().map_err(|_| bad)?;
            Ok(Some((n, end + 2)))
        }
        None if buf.len() > at + 1 + MAX_HEADER_BYTES + 2 => Err(bad),
        None => Ok(None),
    }
}

/// Splits an inline command into words: spaces separate them, and "double"
/// or 'single' quotes group them (with `\n`, `\xHH`, ... escapes in double
/// quotes), as redis-cli and Redis do.
fn split_inline(line: &[u8]) -> Result<Vec<Bytes>, ParseError> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < line.len() {
        while i < line.len() && line[i].is_ascii_whitespace() {
            i += 1;
        }
        if i == line.len() {
            break;
        }
        let mut word = Vec::new();
        match line[i] {
            q @ (b'"' | b'\'') => {
                i += 1;
                loop {
                    let Some(&c) = line.get(i) else {
                        return Err(ParseError::UnbalancedQuotes);
                    };
                    i += 1;
                    if c == q {
                        // A closing quote must end the word.
                        if line.get(i).is_some_and(|c| !c.is_ascii_whitespace()) {
                            return Err(ParseError::UnbalancedQuotes);
                        }
                        break;
                    }
                    if c == b'\\' && q == b'"' {
                        let Some(&e) = line.get(i) else {
                            return Err(ParseError::UnbalancedQuotes);
                        };
                        i += 1;
                        word.push(match e {
                            b'n' => b'\n',
                            b'r' => b'\r',
                            b't' => b'\t',
                            b'b' => 8,
                            b'a' => 7,
                            b'x' if line.len() >= i + 2
                                && line[i].is_ascii_hexdigit()
                                && line[i + 1].is_ascii_hexdigit() =>
                            {
                                let h = std::str::from_utf8(&line[i..i + 2]).unwrap_or("0");
                                i += 2;
                                u8::from_str_radix(h, 16).unwrap_or(0)
                            }
                            other => other,
                        });
                    } else if c == b'\\' && q == b'\'' && line.get(i) == Some(&b'\'') {
                        word.push(b'\'');
                        i += 1;
                    } else {
                        word.push(c);
                    }
                }
            }
            _ => {
                while i < line.len() && !line[i].is_ascii_whitespace() {
                    word.push(line[i]);
                    i += 1;
                }
            }
        }
        out.push(Bytes::from(word));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn parse_all(bytes: &[u8]) -> Result<Vec<Vec<Bytes>>, ParseError> {
        let mut buf = BytesMut::from(bytes);
        let mut out = Vec::new();
        let mut d = Decoder::default();
        while let Some(cmd) = d.next_command(&mut buf)? {
            out.push(cmd);
        }
        Ok(out)
    }

    fn encode(args: &[Vec<u8>]) -> Vec<u8> {
        use redis_protocol::resp2::encode::extend_encode;
        use redis_protocol::resp2::types::BytesFrame;
        let frame = BytesFrame::Array(
            args.iter()
                .map(|a| BytesFrame::BulkString(Bytes::from(a.clone())))
                .collect(),
        );
        let mut buf = BytesMut::new();
        extend_encode(&mut buf, &frame, false).expect("encodes");
        buf.to_vec()
    }

    #[test]
    fn multibulk_and_inline_commands() {
        assert_eq!(
            parse_all(b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\nPING\r\nset a \"b c\\x41\"\n").unwrap(),
            vec![
                vec![Bytes::from("GET"), Bytes::from("k")],
                vec![Bytes::from("PING")],
                vec![Bytes::from("set"), Bytes::from("a"), Bytes::from("b cA")],
            ]
        );
        // Binary-safe bulk strings.
        assert_eq!(
            parse_all(b"*1\r\n$4\r\n\r\n\0\n\r\n").unwrap(),
            vec![vec![Bytes::from_static(b"\r\n\0\n")]]
        );
    }

    #[test]
    fn incomplete_commands_consume_nothing() {
        let full = b"*2\r\n$3\r\nGET\r\n$3\r\nkey\r\n";
        for cut in 0..full.len() {
            let mut buf = BytesMut::from(&full[..cut]);
            let mut d = Decoder::default();
            assert_eq!(d.next_command(&mut buf), Ok(None), "cut at {cut}");
            assert_eq!(buf.len(), cut);
            // The rest arrives one byte at a time.
            let mut got = None;
            for &b in &full[cut..] {
                buf.extend_from_slice(&[b]);
                got = d.next_command(&mut buf).unwrap();
            }
            assert_eq!(got, Some(vec![Bytes::from("GET"), Bytes::from("key")]));
            assert!(buf.is_empty());
        }
    }

    #[test]
    fn hostile_frames_are_errors_before_any_allocation() {
        for (bytes, err) in [
            (&b"*99999999999\r\n"[..], ParseError::BadArrayLen),
            (b"*2000000\r\n", ParseError::BadArrayLen),
            (b"*1\r\n$999999999\r\n", ParseError::BadBulkLen),
            (b"*1\r\n$-1\r\n", ParseError::BadBulkLen),
            (b"*1\r\n*1\r\n$1\r\na\r\n", ParseError::ExpectedBulk('*')),
            (b"*1\r\n$1\r\nab\r\n", ParseError::MissingCrlf),
            (b"*x\r\n", ParseError::BadArrayLen),
            (
                b"*111111111111111111111111111111111111111",
                ParseError::BadArrayLen,
            ),
        ] {
            assert_eq!(
                parse_all(bytes),
                Err(err),
                "{:?}",
                String::from_utf8_lossy(bytes)
            );
        }
        assert_eq!(
            parse_all(&vec![b'a'; MAX_INLINE_BYTES + 1]),
            Err(ParseError::InlineTooLong)
        );
        assert_eq!(parse_all(b"set a \"b\n"), Err(ParseError::UnbalancedQuotes));
    }

    proptest! {
        /// What the `redis-protocol` crate encodes (as a client library
        /// would), split anywhere, decodes to the same arguments.
        #[test]
        fn decodes_what_a_client_encodes(
            cmds in prop::collection::vec(
                prop::collection::vec(prop::collection::vec(any::<u8>(), 0..40), 1..6),
                1..5,
            ),
            cut in any::<prop::sample::Index>(),
        ) {
            let wire: Vec<u8> = cmds.iter().flat_map(|c| encode(c)).collect();
            let cut = cut.index(wire.len() + 1);
            let mut buf = BytesMut::from(&wire[..cut]);
            let mut got = Vec::new();
            let mut d = Decoder::default();
            while let Some(c) = d.next_command(&mut buf).unwrap() {
                got.push(c);
            }
            buf.extend_from_slice(&wire[cut..]);
            while let Some(c) = d.next_command(&mut buf).unwrap() {
                got.push(c);
            }
            let want: Vec<Vec<Bytes>> = cmds
                .iter()
                .map(|c| c.iter().map(|a| Bytes::from(a.clone())).collect())
                .collect();
            prop_assert_eq!(got, want);
            prop_assert!(buf.is_empty());
        }

        /// Arbitrary bytes never panic, and every decoded command consumed
        /// at least one byte (no endless loop).
        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
            let mut buf = BytesMut::from(&bytes[..]);
            let mut d = Decoder::default();
            loop {
                let before = buf.len();
                match d.next_command(&mut buf) {
                    Ok(Some(_)) => prop_assert!(buf.len() < before),
                    Ok(None) | Err(_) => break,
                }
            }
        }

        /// Arbitrary bytes after a valid array header: never panics.
        #[test]
        fn fuzzed_multibulk_never_panics(
            n in 0usize..4,
            tail in prop::collection::vec(
                prop::sample::select(vec![b'$', b'*', b'\r', b'\n', b'1', b'2', b'-', b'a', 0u8]),
                0..80,
            ),
        ) {
            let mut bytes = format!("*{n}\r\n").into_bytes();
            bytes.extend_from_slice(&tail);
            let mut buf = BytesMut::from(&bytes[..]);
            let _ = Decoder::default().next_command(&mut buf);
        }
    }
}
