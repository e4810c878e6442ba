//! The control plane: each `io.ember.Supervisor` call is parsed into a
//! typed [`Request`] (one file per request kind), handed to the daemon's
//! single state owner, and its typed result or error is turned back into a
//! Varlink reply.

pub mod container;
pub mod deploy;
pub mod events;
pub mod health;
pub mod history;
pub mod install;
pub mod list;
pub mod logs;
pub mod pool;
pub mod rollout;
pub mod status;
pub mod uninstall;

use serde::de::DeserializeOwned;
use serde_json::{json, Map, Value};

use crate::varlink::service::{self, invalid_parameter};
use crate::varlink::{Call, CallError, ErrorReply, FrameDecoder, FrameError, MAX_MESSAGE};

/// Varlink error names of `io.ember.Supervisor`.
pub mod errors {
    /// No module of that name is installed.
    pub const MODULE_NOT_FOUND: &str = "io.ember.Supervisor.ModuleNotFound";
    /// The manifest is unreadable as a manifest.
    pub const INVALID_MANIFEST: &str = "io.ember.Supervisor.InvalidManifest";
    /// A parameter is out of range or a path cannot be used.
    pub const INVALID_INPUT: &str = "io.ember.Supervisor.InvalidInput";
    /// A module of that name is already installed.
    pub const ALREADY_INSTALLED: &str = "io.ember.Supervisor.AlreadyInstalled";
    /// A declared listener's port is taken.
    pub const PORT_IN_USE: &str = "io.ember.Supervisor.PortInUse";
    /// The install could not be completed (state directory, artifact copy).
    pub const INSTALL_FAILED: &str = "io.ember.Supervisor.InstallFailed";
    /// A rollout of the module is in progress.
    pub const ROLLOUT_IN_PROGRESS: &str = "io.ember.Supervisor.RolloutInProgress";
    /// No such revision in the module's history.
    pub const REVISION_NOT_FOUND: &str = "io.ember.Supervisor.RevisionNotFound";
    /// The module has no rollout in progress.
    pub const NO_ROLLOUT: &str = "io.ember.Supervisor.NoRollout";
    /// The peer is not on the allow list.
    pub const PERMISSION_DENIED: &str = "io.ember.Supervisor.PermissionDenied";
    /// The bytes on the socket are not Varlink.
    pub const PROTOCOL_ERROR: &str = "io.ember.Supervisor.ProtocolError";
    /// The daemon is stopping.
    pub const SHUTTING_DOWN: &str = "io.ember.Supervisor.ShuttingDown";
    /// An `Events` subscriber fell behind by more than emberd keeps and
    /// was dropped; `missed` says how many events it lost.
    pub const EVENTS_LAGGED: &str = "io.ember.Supervisor.EventsLagged";
    /// A container of that id exists already (or its instance name is
    /// taken).
    pub const CONFLICT: &str = "io.ember.Supervisor.Conflict";
}

/// A parsed `io.ember.Supervisor` call.
#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    /// `Install`.
    Install(install::Install),
    /// `Uninstall`.
    Uninstall(uninstall::Uninstall),
    /// `List`.
    List(list::List),
    /// `Status`.
    Status(status::Status),
    /// `Health`.
    Health(health::Health),
    /// `Pool`.
    Pool(pool::Pool),
    /// `Logs`.
    Logs(logs::Logs),
    /// `Deploy`.
    Deploy(deploy::Deploy),
    /// `Rollback`.
    Rollback(deploy::Rollback),
    /// `History`.
    History(history::History),
    /// `Rollout`.
    Rollout(rollout::Rollout),
    /// `Events`.
    Events(events::Events),
    /// `RunContainer`.
    RunContainer(container::RunContainer),
    /// `WaitContainer`.
    WaitContainer(container::ContainerId),
    /// `KillContainer`.
    KillContainer(container::KillContainer),
    /// `RemoveContainer`.
    RemoveContainer(container::ContainerId),
    /// `ContainerStatus`.
    ContainerStatus(container::ContainerId),
    /// `UpdateContainer`.
    UpdateContainer(container::UpdateContainer),
}

/// What one frame read from the control socket asks for: the call, and
/// either what to do with it or the error to answer with.
#[derive(Debug, Clone, PartialEq)]
pub struct Decoded {
    /// The call as sent (`oneway`, `more`…).
    pub call: Call,
    /// What it asks for, or why it is refused.
    pub action: Result<Action, ErrorReply>,
}

/// A call the daemon can act on.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// `org.varlink.service` (introspection): the reply's parameters,
    /// computed without the state owner.
    Service(Value),
    /// An `io.ember.Supervisor` request for the state owner.
    Supervisor(Request),
}

/// Decodes one frame (its NUL terminator removed) into a typed action:
/// the control socket's whole parse step, a pure function of the bytes
/// (fuzzed by `supervisor/fuzz`, replayed by its corpus test).
///
/// `Err` means the bytes are not a Varlink call at all (the server answers
/// `ProtocolError` and closes the connection); a call that is well formed
/// but asks for something unknown or invalid decodes to an `action` error
/// (the server answers it and reads on).
pub fn decode_call(frame: &[u8]) -> Result<Decoded, CallError> {
    let call = Call::parse(frame)?;
    let action = route(&call);
    Ok(Decoded { call, action })
}

/// What the control socket makes of a byte stream arriving in `chunks`:
/// frames cut as the server cuts them ([`FrameDecoder`] with
/// [`MAX_MESSAGE`]), each decoded by [`decode_call`], until the first
/// framing error (the server answers it and closes) or a frame that is not
/// a call (likewise). Bytes of an unfinished frame at the end are left.
/// The entry point of the fuzz target and of its corpus test.
pub fn decode_stream<'a>(
    chunks: impl IntoIterator<Item = &'a [u8]>,
) -> Result<Vec<Decoded>, StreamError> {
    let mut decoder = FrameDecoder::new(MAX_MESSAGE);
    let mut out = Vec::new();
    for chunk in chunks {
        decoder.extend(chunk);
        while let Some(frame) = decoder.next_frame().map_err(StreamError::Frame)? {
            out.push(decode_call(&frame).map_err(StreamError::Call)?);
        }
    }
    Ok(out)
}

/// Why the control socket closes a connection on its input.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// A frame is too large.
    #[error("framing")]
    Frame(#[source] FrameError),
    /// A frame is not a Varlink call.
    #[error("not a call")]
    Call(#[source] CallError),
}

fn route(call: &Call) -> Result<Action, ErrorReply> {
    if call.upgrade {
        return Err(invalid_parameter("upgrade"));
    }
    let (iface, member) = call
        .interface_and_member()
        .map_err(|_| service::method_not_found(&call.method))?;
    match iface {
        service::INTERFACE => service::handle(member, &call.parameters).map(Action::Service),
        service::EMBER_INTERFACE => parse(member, &call.parameters).map(Action::Supervisor),
        other => Err(service::interface_not_found(other)),
    }
}

/// Parses the member name and parameters of an `io.ember.Supervisor` call.
pub fn parse(member: &str, parameters: &Map<String, Value>) -> Result<Request, ErrorReply> {
    Ok(match member {
        "Install" => Request::Install(decode(parameters)?),
        "Uninstall" => Request::Uninstall(decode(parameters)?),
        "List" => Request::List(decode(parameters)?),
        "Status" => Request::Status(decode(parameters)?),
        "Health" => Request::Health(decode(parameters)?),
        "Pool" => Request::Pool(decode(parameters)?),
        "Logs" => Request::Logs(decode::<logs::Logs>(parameters)?.validated()?),
        "Deploy" => Request::Deploy(decode(parameters)?),
        "Rollback" => Request::Rollback(decode(parameters)?),
        "History" => Request::History(decode(parameters)?),
        "Events" => Request::Events(decode(parameters)?),
        "RunContainer" => {
            Request::RunContainer(decode::<container::RunContainer>(parameters)?.validated()?)
        }
        "WaitContainer" => Request::WaitContainer(decode(parameters)?),
        "KillContainer" => Request::KillContainer(decode(parameters)?),
        "RemoveContainer" => Request::RemoveContainer(decode(parameters)?),
        "ContainerStatus" => Request::ContainerStatus(decode(parameters)?),
        "UpdateContainer" => {
            Request::UpdateContainer(decode::<container::UpdateContainer>(parameters)?.validated()?)
        }
        "Rollout" => {
            let r: rollout::Rollout = decode(parameters)?;
            r.action()?;
            Request::Rollout(r)
        }
        other => {
            return Err(crate::varlink::service::method_not_found(&format!(
                "{}.{other}",
                crate::varlink::service::EMBER_INTERFACE
            )))
        }
    })
}

/// Decodes parameters into a request struct; a bad or missing field gives
/// `org.varlink.service.InvalidParameter` naming it.
pub(crate) fn decode<T: DeserializeOwned>(
    parameters: &Map<String, Value>,
) -> Result<T, ErrorReply> {
    serde_json::from_value(Value::Object(parameters.clone())).map_err(|e| {
        let msg = e.to_string();
        let named = msg
            .split('`')
            .nth(1)
            .filter(|f| !f.is_empty() && f.len() < 64)
            .filter(|_| msg.starts_with("unknown field") || msg.starts_with("missing field"));
        // A value of the wrong type or range: serde's message names the
        // value, not the field. The culprit is the parameter without which
        // the rest decodes (or is only missing that one).
        let culprit = || {
            parameters.keys().find(|k| {
                let mut rest = parameters.clone();
                rest.remove(*k);
                match serde_json::from_value::<T>(Value::Object(rest)) {
                    Ok(_) => true,
                    Err(e) => e.to_string().contains(&format!("missing field `{k}`")),
                }
            })
        };
        let field = named
            .map(str::to_owned)
            .or_else(|| culprit().cloned())
            .unwrap_or_else(|| "parameters".into());
        invalid_parameter(&field)
    })
}

/// `ModuleNotFound`.
pub(crate) fn module_not_found(name: &str) -> ErrorReply {
    ErrorReply::new(errors::MODULE_NOT_FOUND, json!({ "name": name }))
}

/// `InvalidInput`.
pub(crate) fn invalid_input(reason: impl Into<String>) -> ErrorReply {
    ErrorReply::new(errors::INVALID_INPUT, json!({ "reason": reason.into() }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn parses_each_kind() {
        assert_eq!(
            parse("Install", &p(json!({"path": "/m"}))).unwrap(),
            Request::Install(install::Install {
                path: "/m".into(),
                entry: None
            })
        );
        assert!(matches!(
            parse("List", &Map::new()).unwrap(),
            Request::List(_)
        ));
        assert!(matches!(
            parse("Logs", &p(json!({"name": "kv", "lines": 3}))).unwrap(),
            Request::Logs(logs::Logs { lines: Some(3), .. })
        ));
    }

    #[test]
    fn bad_parameters_are_named() {
        let e = parse("Status", &Map::new()).unwrap_err();
        assert_eq!(e.name, "org.varlink.service.InvalidParameter");
        assert_eq!(e.parameters["parameter"], "name");
        let e = parse("Status", &p(json!({"name": 3}))).unwrap_err();
        assert_eq!(e.name, "org.varlink.service.InvalidParameter");
        let e = parse("List", &p(json!({"bogus": 1}))).unwrap_err();
        assert_eq!(e.parameters["parameter"], "bogus");
        let e = parse("Rollout", &p(json!({"name": "kv", "action": "explode"}))).unwrap_err();
        assert_eq!(e.name, errors::INVALID_INPUT);
        assert!(e.parameters["reason"].as_str().unwrap().contains("explode"));
        assert!(matches!(
            parse("Rollout", &p(json!({"name": "kv", "action": "pause"}))).unwrap(),
            Request::Rollout(r) if r.action().unwrap() == rollout::Action::Pause
        ));
        let e = parse("Deploy", &p(json!({"path": "/m", "max_surge": -1}))).unwrap_err();
        assert_eq!(e.parameters["parameter"], "max_surge");
        let e = parse("Frobnicate", &Map::new()).unwrap_err();
        assert_eq!(e.name, "org.varlink.service.MethodNotFound");
        let e = parse("Logs", &p(json!({"name": "kv", "lines": -1}))).unwrap_err();
        assert_eq!(e.name, "org.varlink.service.InvalidParameter");
        let e = parse("Logs", &p(json!({"name": "kv", "lines": 1_000_000}))).unwrap_err();
        assert_eq!(e.name, errors::INVALID_INPUT);
    }

    // ---- hostile input: the fuzz target's corpus and properties ----

    /// Checks what [`decode_stream`] made of `bytes` cut into reads of
    /// `cut` bytes: no panic (the caller would see it), sane errors, and
    /// every accepted call encodes back to itself.
    fn check_stream(bytes: &[u8], cut: usize) {
        match decode_stream(bytes.chunks(cut.max(1))) {
            Ok(calls) => {
                for d in calls {
                    // Numbers may not round-trip exactly (serde_json's
                    // fast float parsing); the rest does.
                    let wire = d.call.encode();
                    let again = Call::parse(&wire[..wire.len() - 1]).unwrap();
                    assert_eq!(again.method, d.call.method);
                    assert_eq!(
                        (again.more, again.oneway, again.upgrade),
                        (d.call.more, d.call.oneway, d.call.upgrade)
                    );
                    assert!(again.parameters.keys().eq(d.call.parameters.keys()));
                    if let Err(e) = d.action {
                        assert!(
                            e.name.starts_with("org.varlink.service.")
                                || e.name.starts_with("io.ember.Supervisor."),
                            "{e:?}"
                        );
                    }
                }
            }
            Err(e) => {
                let text = crate::error_chain(&e);
                assert!(text.len() > "not a call: ".len(), "{text}");
            }
        }
    }

    /// The committed seed corpus of `supervisor/fuzz` (and what fuzzing
    /// found), as the fuzz target reads it: first byte the read size.
    fn corpus() -> Vec<(String, Vec<u8>)> {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/control_stream");
        let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| {
                let e = e.unwrap();
                (
                    e.file_name().to_string_lossy().into_owned(),
                    std::fs::read(e.path()).unwrap(),
                )
            })
            .collect();
        out.sort();
        out
    }

    #[test]
    fn replays_the_fuzz_corpus() {
        let corpus = corpus();
        assert!(corpus.len() >= 20, "{} entries", corpus.len());
        for (name, bytes) in &corpus {
            let Some((&cut, rest)) = bytes.split_first() else {
                continue;
            };
            let r = std::panic::catch_unwind(|| check_stream(rest, usize::from(cut) + 1));
            assert!(r.is_ok(), "corpus entry {name} panicked");
        }
    }

    #[test]
    fn hostile_frames_get_named_errors() {
        let err = |b: &[u8]| crate::error_chain(&decode_call(b).unwrap_err());
        // Deep nesting stops at serde_json's recursion limit (128), long
        // before the stack.
        let deep = format!(
            "{{\"method\":\"a.B\",\"parameters\":{{\"x\":{}{}}}}}",
            "[".repeat(100_000),
            "]".repeat(100_000)
        );
        assert!(
            err(deep.as_bytes()).contains("recursion limit"),
            "{}",
            err(deep.as_bytes())
        );
        let deep_obj = format!(
            "{{\"method\":\"a.B\",\"parameters\":{}1{}}}",
            "{\"a\":".repeat(50_000),
            "}".repeat(50_000)
        );
        assert!(err(deep_obj.as_bytes()).contains("recursion limit"));
        assert!(err(b"").starts_with("malformed call"));
        assert!(err(br#"{"method":"nodot"}"#).contains("nodot"));
        // Framing: no terminator within the limit.
        let big = vec![b' '; MAX_MESSAGE + 1];
        assert!(matches!(
            decode_stream([&big[..]]),
            Err(StreamError::Frame(_))
        ));
        // A call for an unknown member is answered, not a protocol error.
        let d = decode_call(br#"{"method":"io.ember.Supervisor.Frobnicate"}"#).unwrap();
        assert_eq!(
            d.action.unwrap_err().name,
            "org.varlink.service.MethodNotFound"
        );
    }

    fn seeds() -> Vec<Vec<u8>> {
        corpus()
            .into_iter()
            .filter_map(|(_, b)| b.get(1..).map(<[u8]>::to_vec))
            .collect()
    }

    /// A byte-level mutation of a seed: (position, what).
    #[derive(Debug, Clone)]
    enum Mutation {
        Flip(usize, u8),
        Insert(usize, Vec<u8>),
        Delete(usize, usize),
        Truncate(usize),
    }

    fn mutate(mut b: Vec<u8>, ms: &[Mutation]) -> Vec<u8> {
        for m in ms {
            let n = b.len().max(1);
            match m {
                Mutation::Flip(i, x) => {
                    if let Some(c) = b.get_mut(i % n) {
                        *c ^= x;
                    }
                }
                Mutation::Insert(i, bytes) => {
                    let at = (i % n).min(b.len());
                    b.splice(at..at, bytes.iter().copied());
                }
                Mutation::Delete(i, len) => {
                    let at = (i % n).min(b.len());
                    let end = (at + len).min(b.len());
                    b.drain(at..end);
                }
                Mutation::Truncate(i) => b.truncate(i % n),
            }
        }
        b
    }

    fn arb_mutation() -> impl proptest::strategy::Strategy<Value = Mutation> {
        use proptest::prelude::*;
        const TOKENS: &[&[u8]] = &[
            b"\0",
            b"{",
            b"}",
            b"[",
            b"]",
            b"\"",
            b",",
            b":",
            b"\\",
            b"null",
            b"1e999",
            b"\"more\":true",
            b"\"oneway\":true",
            b"\"parameters\":{}",
            b"\xff",
        ];
        prop_oneof![
            (any::<usize>(), 1u8..).prop_map(|(i, x)| Mutation::Flip(i, x)),
            (any::<usize>(), prop::collection::vec(any::<u8>(), 1..8))
                .prop_map(|(i, b)| Mutation::Insert(i, b)),
            (any::<usize>(), prop::sample::select(TOKENS))
                .prop_map(|(i, t)| Mutation::Insert(i, t.to_vec())),
            (any::<usize>(), 1usize..16).prop_map(|(i, n)| Mutation::Delete(i, n)),
            any::<usize>().prop_map(Mutation::Truncate),
        ]
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..2048), cut in 1usize..300) {
            check_stream(&bytes, cut);
        }

        #[test]
        fn mutated_calls_never_panic(seed in proptest::prelude::any::<proptest::sample::Index>(), ms in proptest::collection::vec(arb_mutation(), 1..6), cut in 1usize..300) {
            let seeds = seeds();
            let bytes = mutate(seed.get(&seeds).clone(), &ms);
            check_stream(&bytes, cut);
        }
    }
}
