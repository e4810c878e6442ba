//! The control plane: each `io.ember.Supervisor` call is parsed into a
//! typed [`Request`] (one file per request kind), handed to the daemon's
//! single state owner, and its typed result or error is turned back into a
//! Varlink reply.

pub mod health;
pub mod install;
pub mod list;
pub mod logs;
pub mod pool;
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
        let field = msg
            .split('`')
            .nth(1)
            .filter(|f| !f.is_empty() && f.len() < 64)
            .unwrap_or("parameters");
        invalid_parameter(field)
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
        let e = parse("Frobnicate", &Map::new()).unwrap_err();
        assert_eq!(e.name, "org.varlink.service.MethodNotFound");
        let e = parse("Logs", &p(json!({"name": "kv", "lines": -1}))).unwrap_err();
        assert_eq!(e.name, "org.varlink.service.InvalidParameter");
        let e = parse("Logs", &p(json!({"name": "kv", "lines": 1_000_000}))).unwrap_err();
        assert_eq!(e.name, errors::INVALID_INPUT);
    }
}
