//! The control plane: each `io.ember.Supervisor` call is parsed into a
//! typed [`Request`] (one file per request kind), handed to the daemon's
//! single state owner, and its typed result or error is turned back into a
//! Varlink reply.

pub mod deploy;
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

use crate::varlink::service::invalid_parameter;
use crate::varlink::ErrorReply;

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
}

/// A parsed `io.ember.Supervisor` call.
#[derive(Debug, Clone, PartialEq, Eq)]
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
            Request::Install(install::Install { path: "/m".into() })
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
}
