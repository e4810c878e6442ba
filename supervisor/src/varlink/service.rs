//! `org.varlink.service`: introspection every Varlink service answers.

use serde_json::{json, Value};

use super::ErrorReply;

/// The name of the introspection interface.
pub const INTERFACE: &str = "org.varlink.service";
/// The name of Ember's own interface.
pub const EMBER_INTERFACE: &str = "io.ember.Supervisor";
/// The text of `io.ember.Supervisor`.
pub const EMBER_DESCRIPTION: &str = include_str!("../../io.ember.Supervisor.varlink");
/// The text of `org.varlink.service`.
pub const SERVICE_DESCRIPTION: &str = include_str!("org.varlink.service.varlink");

/// `org.varlink.service.MethodNotFound`.
pub fn method_not_found(method: &str) -> ErrorReply {
    ErrorReply::new(
        "org.varlink.service.MethodNotFound",
        json!({ "method": method }),
    )
}

/// `org.varlink.service.InterfaceNotFound`.
pub fn interface_not_found(interface: &str) -> ErrorReply {
    ErrorReply::new(
        "org.varlink.service.InterfaceNotFound",
        json!({ "interface": interface }),
    )
}

/// `org.varlink.service.InvalidParameter`.
pub fn invalid_parameter(parameter: &str) -> ErrorReply {
    ErrorReply::new(
        "org.varlink.service.InvalidParameter",
        json!({ "parameter": parameter }),
    )
}

/// `org.varlink.service.ExpectedMore`.
pub fn expected_more() -> ErrorReply {
    ErrorReply::new("org.varlink.service.ExpectedMore", json!({}))
}

/// Answers an `org.varlink.service` call.
pub fn handle(
    member: &str,
    parameters: &serde_json::Map<String, Value>,
) -> Result<Value, ErrorReply> {
    match member {
        "GetInfo" => Ok(json!({
            "vendor": "Ember",
            "product": "emberd",
            "version": env!("CARGO_PKG_VERSION"),
            "url": "https://example.invalid/ember",
            "interfaces": [INTERFACE, EMBER_INTERFACE],
        })),
        "GetInterfaceDescription" => {
            let Some(iface) = parameters.get("interface") else {
                return Err(invalid_parameter("interface"));
            };
            let Some(iface) = iface.as_str() else {
                return Err(invalid_parameter("interface"));
            };
            match iface {
                EMBER_INTERFACE => Ok(json!({ "description": EMBER_DESCRIPTION })),
                INTERFACE => Ok(json!({ "description": SERVICE_DESCRIPTION })),
                other => Err(interface_not_found(other)),
            }
        }
        other => Err(method_not_found(&format!("{INTERFACE}.{other}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describes_both_interfaces() {
        let mut p = serde_json::Map::new();
        p.insert("interface".into(), EMBER_INTERFACE.into());
        let d = handle("GetInterfaceDescription", &p).unwrap();
        assert!(d["description"]
            .as_str()
            .unwrap()
            .contains("interface io.ember.Supervisor"));
        p.insert("interface".into(), "no.such".into());
        assert_eq!(
            handle("GetInterfaceDescription", &p).unwrap_err().name,
            "org.varlink.service.InterfaceNotFound"
        );
        let info = handle("GetInfo", &serde_json::Map::new()).unwrap();
        assert_eq!(info["interfaces"][1], EMBER_INTERFACE);
    }
}
