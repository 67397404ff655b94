"""OpenTelemetry meters and tracers, Prometheus exposition, system stats, logging (the telemetry issue)."""
