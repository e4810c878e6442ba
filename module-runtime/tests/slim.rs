//! A slim module (`hello`: std and the SDK linked dynamically) loaded by a
//! process that did not preload the shared runtime is a clear load error
//! naming what it needs, not a crash; the test zygote, which preloads it,
//! runs the module (`tests/worker.rs`). A slim artifact is never loaded
//! as a plugin.

use module_runtime::host::runtime_libs::{SDK_SONAME_PREFIX, STD_SONAME};
use module_runtime::host::{load_module, LoadError};

#[test]
fn slim_module_without_its_runtime_is_a_clear_load_error() {
    let hello = ember_tests::artifact("hello");
    let e = load_module(&hello).unwrap_err();
    let LoadError::RuntimeNotLoaded { needed, .. } = &e else {
        panic!("{e:?}");
    };
    assert!(needed.contains(STD_SONAME), "{needed}");
    assert!(needed.contains(SDK_SONAME_PREFIX), "{needed}");
    let text = module_runtime::sdk::error_chain(&e);
    assert!(text.contains("is a slim module"), "{text}");
    assert!(text.contains(&hello.display().to_string()), "{text}");
}

#[test]
fn slim_artifact_is_refused_as_a_plugin_before_it_is_loaded() {
    // A plugin runs in the zygote: built slim, it would use the std every
    // slim module shares (and seed its state for all of them).
    let hello = ember_tests::artifact("hello");
    let Err(e) = module_runtime::host::load_plugin(&hello) else {
        panic!("a slim artifact was loaded as a plugin");
    };
    assert!(matches!(e, LoadError::SlimPlugin { .. }), "{e:?}");
    let text = e.to_string();
    assert!(text.contains("plugins are built fat"), "{text}");
    assert!(text.contains(STD_SONAME), "{text}");
}
