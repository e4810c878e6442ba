//! The Ember module SDK as a Rust `dylib`.
pub use module_runtime::*;
