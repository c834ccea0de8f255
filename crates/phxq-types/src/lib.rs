//! Identifiers shared by every phxq layer.
//!
//! This crate sits at the bottom of the dependency graph: it holds plain data and no I/O, no
//! clock and no randomness, so the sans-IO core and the simulator can use it freely.

use std::fmt;

/// A replication group: one consensus group inside a store.
///
/// A store runs many groups so that masters spread over its nodes; queue `q` of a topic lives
/// in group `q mod groups`. Every node of the store hosts every group, and all the groups of a
/// node share that node's write-ahead log.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GroupId(pub u64);

impl fmt::Display for GroupId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "g{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_ids_print_with_a_prefix_and_order_numerically() {
        assert_eq!(GroupId(7).to_string(), "g7");
        assert!(GroupId(2) < GroupId(10));
    }
}
