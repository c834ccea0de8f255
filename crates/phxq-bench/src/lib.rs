//! placeholder during dependency fetch
