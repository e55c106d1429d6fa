//! The `[telemetry]` section: exporting traces over OTLP (off unless an endpoint is
//! named). What is exported is described in README.md, "Observing Keelson".

use serde::Deserialize;

/// The `[telemetry]` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// Base URL of an OTLP/HTTP (protobuf) collector, e.g. `http://127.0.0.1:4318`;
    /// spans are POSTed to `{otlp_endpoint}/v1/traces`. Unset (the default): no span
    /// is exported and no exporter runs.
    pub otlp_endpoint: Option<String>,
    /// Share of the traces this process starts that are recorded, 0.0 to 1.0. A
    /// request that arrives with a trace context follows its sender's decision
    /// (parent-based sampling).
    pub sampling_ratio: f64,
    /// `service.name` of the exported spans; default `keelson-gateway`,
    /// `keelson-logic-server` or `keelson` (embedded), after the process's role.
    pub service_name: Option<String>,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            otlp_endpoint: None,
            sampling_ratio: 1.0,
            service_name: None,
        }
    }
}

impl TelemetryConfig {
    /// Refuse an endpoint that is not an `http://` URL and a ratio outside 0..=1.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(endpoint) = &self.otlp_endpoint {
            let rest = endpoint.strip_prefix("http://").ok_or_else(|| {
                format!(
                    "at key `telemetry.otlp_endpoint`: `{endpoint}` is not supported: expected an http:// URL of an OTLP/HTTP collector, e.g. `http://127.0.0.1:4318`"
                )
            })?;
            if rest.is_empty() || rest.starts_with('/') {
                return Err(format!(
                    "at key `telemetry.otlp_endpoint`: `{endpoint}` names no host: expected e.g. `http://127.0.0.1:4318`"
                ));
            }
        }
        if !(0.0..=1.0).contains(&self.sampling_ratio) {
            return Err(format!(
                "at key `telemetry.sampling_ratio`: {} is out of range: expected a number from 0.0 to 1.0",
                self.sampling_ratio
            ));
        }
        if self.service_name.as_deref().is_some_and(str::is_empty) {
            return Err(
                "at key `telemetry.service_name`: empty: expected a name, or leave it out for the role's default"
                    .to_owned(),
            );
        }
        Ok(())
    }

    /// The URL spans are sent to, when export is on.
    pub fn traces_url(&self) -> Option<String> {
        let base = self.otlp_endpoint.as_deref()?.trim_end_matches('/');
        Some(if base.ends_with("/v1/traces") {
            base.to_owned()
        } else {
            format!("{base}/v1/traces")
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn bad_values_are_refused_with_the_key() {
        let bad = [
            TelemetryConfig {
                otlp_endpoint: Some("127.0.0.1:4318".into()),
                ..TelemetryConfig::default()
            },
            TelemetryConfig {
                otlp_endpoint: Some("https://collector:4318".into()),
                ..TelemetryConfig::default()
            },
            TelemetryConfig {
                sampling_ratio: 1.5,
                ..TelemetryConfig::default()
            },
        ];
        for config in bad {
            let e = config.validate().unwrap_err();
            assert!(e.starts_with("at key `telemetry."), "{e}");
        }
        assert!(TelemetryConfig::default().validate().is_ok());
        assert_eq!(TelemetryConfig::default().traces_url(), None);
        let on = TelemetryConfig {
            otlp_endpoint: Some("http://127.0.0.1:4318/".into()),
            ..TelemetryConfig::default()
        };
        assert_eq!(
            on.traces_url().as_deref(),
            Some("http://127.0.0.1:4318/v1/traces")
        );
    }
}
