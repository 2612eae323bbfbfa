// Structure-aware mutations for the property tests that run the fuzz targets'
// bodies on stable (`common/tests/wire_props.rs`, `slave/tests/fullsync_props.rs`
// `include!` this file): a valid encoding is flipped, truncated, extended,
// patched and spliced, so the decoders see inputs close to what they accept.

use proptest::prelude::*;

/// One edit of an encoding; positions are taken modulo the length.
#[derive(Clone, Debug)]
pub enum Mutation {
    /// XOR one byte with a non-zero mask.
    Flip(usize, u8),
    /// Cut the input at a position.
    Truncate(usize),
    /// Append bytes.
    Extend(Vec<u8>),
    /// Overwrite bytes at a position (e.g. a varint turned huge: `0xff...`).
    Patch(usize, Vec<u8>),
    /// Copy `len` bytes from one position to another (inserted there).
    Splice { from: usize, len: usize, to: usize },
}

pub fn arb_mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        3 => (any::<usize>(), 1..=255u8).prop_map(|(at, mask)| Mutation::Flip(at, mask)),
        2 => any::<usize>().prop_map(Mutation::Truncate),
        1 => prop::collection::vec(any::<u8>(), 1..32).prop_map(Mutation::Extend),
        2 => (
            any::<usize>(),
            prop_oneof![
                prop::collection::vec(any::<u8>(), 1..12),
                (1..11usize).prop_map(|n| vec![0xff; n]),
            ]
        )
            .prop_map(|(at, bytes)| Mutation::Patch(at, bytes)),
        2 => (any::<usize>(), 1..64usize, any::<usize>())
            .prop_map(|(from, len, to)| Mutation::Splice { from, len, to }),
    ]
}

/// Up to `max` mutations (possibly none: the valid encoding itself).
pub fn arb_mutations(max: usize) -> impl Strategy<Value = Vec<Mutation>> {
    prop::collection::vec(arb_mutation(), 0..=max)
}

pub fn apply(mut data: Vec<u8>, mutations: &[Mutation]) -> Vec<u8> {
    for m in mutations {
        let len = data.len();
        match m {
            Mutation::Flip(at, mask) if len > 0 => data[at % len] ^= mask,
            Mutation::Flip(..) => {}
            Mutation::Truncate(at) => data.truncate(at % (len + 1)),
            Mutation::Extend(bytes) => data.extend_from_slice(bytes),
            Mutation::Patch(at, bytes) => {
                let at = at % (len + 1);
                for (i, b) in bytes.iter().enumerate() {
                    match data.get_mut(at + i) {
                        Some(d) => *d = *b,
                        None => data.push(*b),
                    }
                }
            }
            Mutation::Splice { from, len: n, to } if len > 0 => {
                let from = from % len;
                let piece = data[from..(from + n).min(len)].to_vec();
                let to = to % (len + 1);
                data.splice(to..to, piece);
            }
            Mutation::Splice { .. } => {}
        }
    }
    data
}
