//! Sizes every client request is checked against before it reaches the committer.

/// Largest key accepted (64 KiB).
pub const MAX_KEY_BYTES: usize = 64 << 10;
/// Largest value accepted (16 MiB).
pub const MAX_VALUE_BYTES: usize = 16 << 20;
/// Most operations in one Txn.
pub const MAX_TXN_OPS: usize = 10_000;
/// Largest total of keys and values in one Txn (64 MiB).
pub const MAX_TXN_BYTES: usize = 64 << 20;
/// Largest gRPC message a server accepts: a full Txn plus framing.
pub const MAX_MESSAGE_BYTES: usize = MAX_TXN_BYTES + (4 << 20);
/// Keys plus values one `Scan` answer holds at most (4 MiB); an answer
/// stops before the entry that would cross it (but holds at least one entry,
/// so a value larger than this is served alone) and says `more`.
pub const MAX_SCAN_BYTES: usize = 4 << 20;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LimitError {
    #[error("key must not be empty")]
    EmptyKey,
    #[error("key is {len} bytes; the limit is {MAX_KEY_BYTES}")]
    KeyTooLong { len: usize },
    #[error("value is {len} bytes; the limit is {MAX_VALUE_BYTES}")]
    ValueTooLong { len: usize },
    #[error("txn has {ops} ops; the limit is {MAX_TXN_OPS}")]
    TooManyOps { ops: usize },
    #[error("txn holds {bytes} bytes of keys and values; the limit is {MAX_TXN_BYTES}")]
    TxnTooLarge { bytes: usize },
    #[error("txn has no ops")]
    EmptyTxn,
}

pub fn check_key(key: &[u8]) -> Result<(), LimitError> {
    if key.is_empty() {
        return Err(LimitError::EmptyKey);
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(LimitError::KeyTooLong { len: key.len() });
    }
    Ok(())
}

pub fn check_value(value: &[u8]) -> Result<(), LimitError> {
    if value.len() > MAX_VALUE_BYTES {
        return Err(LimitError::ValueTooLong { len: value.len() });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_values_at_and_over_the_limits() {
        assert_eq!(check_key(b""), Err(LimitError::EmptyKey));
        assert_eq!(check_key(&vec![1; MAX_KEY_BYTES]), Ok(()));
        assert_eq!(
            check_key(&vec![1; MAX_KEY_BYTES + 1]),
            Err(LimitError::KeyTooLong {
                len: MAX_KEY_BYTES + 1
            })
        );
        assert_eq!(check_value(&vec![1; MAX_VALUE_BYTES]), Ok(()));
        assert_eq!(
            check_value(&vec![1; MAX_VALUE_BYTES + 1]),
            Err(LimitError::ValueTooLong {
                len: MAX_VALUE_BYTES + 1
            })
        );
    }
}
