// Body of the `history` fuzz target, kept in its own file so that
// `common/tests/wire_props.rs` can `include!` it and run it on stable.
//
// The property: `Histories::decode_ancestors` (the history list stored in the
// meta column family, carried by checkpoints) takes any bytes without a
// panic; what it accepts is at most `MAX_ANCESTORS` entries that encode back
// to exactly the input, and checking positions against it never panics.

use tern_common::history::{Histories, MAX_ANCESTORS};
use tern_common::position::{Index, Position, ReplId};

pub fn check(data: &[u8]) {
    let Ok(ancestors) = Histories::decode_ancestors(data) else {
        return;
    };
    assert!(ancestors.len() <= MAX_ANCESTORS);
    let h = Histories {
        current: ReplId(u128::MAX),
        ancestors,
    };
    assert_eq!(h.encode_ancestors(), data);
    // Positions taken from the list itself, either side of each end.
    for a in &h.ancestors {
        for index in [
            a.end.get().saturating_sub(1),
            a.end.get(),
            a.end.get().saturating_add(1),
        ] {
            let pos = Position {
                repl_id: a.repl_id,
                index: Index(index),
            };
            let later_min = h
                .ancestors
                .iter()
                .rposition(|x| x.repl_id == a.repl_id)
                .map(|i| {
                    h.ancestors[i..]
                        .iter()
                        .map(|x| x.end)
                        .min()
                        .expect("non-empty")
                });
            let ok = h.check(pos).is_ok();
            if a.repl_id != h.current {
                assert_eq!(ok, later_min.is_some_and(|end| pos.index <= end));
            } else {
                assert!(ok);
            }
        }
    }
    let mut forked = h.clone();
    forked.fork(Index(1), ReplId(1));
    assert!(forked.ancestors.len() <= MAX_ANCESTORS);
    assert_eq!(
        Histories::decode_ancestors(&forked.encode_ancestors()),
        Ok(forked.ancestors.clone())
    );
}
