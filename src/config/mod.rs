//! Config file: TOML schema, defaults, validation with file:line:column errors, check-config report.
