//! `--config FILE` (TOML) for the daemons: a key per flag (`node-timeout = "3s"`, `labels =
//! "zone=a"`, `allow-command = true`). Precedence: flags, then `TESSERA_*` environment variables,
//! then the file, then built-in defaults. `--print-config` shows the merged result and where each
//! value came from, with secrets masked.

use std::ffi::OsString;

use clap::parser::ValueSource;
use clap::{ArgMatches, Command, CommandFactory, FromArgMatches};

/// Flags whose values are secrets: shown masked.
const SECRETS: &[&str] = &["token"];

/// The flags the config file set, for `--print-config`.
static FROM_FILE: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

/// Parses the command line of `T` with the config file (from `--config` or `TESSERA_CONFIG`)
/// folded in as defaults. Exits with status 2 and a clear message on a bad file, like clap does.
pub fn parse<T: CommandFactory + FromArgMatches>() -> (T, ArgMatches, Command) {
    let args: Vec<OsString> = std::env::args_os().collect();
    let mut cmd = T::command()
        .arg(
            clap::Arg::new("config")
                .long("config")
                .env("TESSERA_CONFIG")
                .value_name("FILE")
                .help("TOML file with defaults for these flags (one key per flag; flags and TESSERA_* variables win)")
                .global(false),
        )
        .arg(
            clap::Arg::new("print_config")
                .long("print-config")
                .action(clap::ArgAction::SetTrue)
                .help("Print the merged configuration (secrets masked) and exit"),
        );
    if let Some(path) = config_path(&args) {
        match apply(cmd.clone(), &path) {
            Ok(c) => cmd = c,
            Err(e) => {
                eprintln!("error: {e}");
                std::process::exit(2);
            }
        }
    }
    let matches = cmd.clone().get_matches_from(args);
    match T::from_arg_matches(&matches) {
        Ok(t) => (t, matches, cmd),
        Err(e) => e.exit(),
    }
}

fn config_path(args: &[OsString]) -> Option<String> {
    let mut it = args.iter().map(|a| a.to_string_lossy().to_string());
    while let Some(a) = it.next() {
        if a == "--config" {
            return it.next();
        }
        if let Some(v) = a.strip_prefix("--config=") {
            return Some(v.to_string());
        }
    }
    std::env::var("TESSERA_CONFIG").ok()
}

/// Sets the file's values as the flags' defaults.
pub fn apply(mut cmd: Command, path: &str) -> Result<Command, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read --config {path}: {e}"))?;
    let table: toml::Table = toml::from_str(&text).map_err(|e| format!("{path}: invalid TOML: {e}"))?;
    for (key, value) in table {
        let id = key.replace('-', "_");
        if matches!(id.as_str(), "config" | "print_config") || !cmd.get_arguments().any(|a| a.get_id() == id.as_str()) {
            let mut valid: Vec<String> = cmd
                .get_arguments()
                .filter(|a| {
                    a.get_long().is_some()
                        && !matches!(a.get_id().as_str(), "config" | "print_config" | "help" | "version")
                })
                .filter_map(|a| a.get_long().map(str::to_string))
                .collect();
            valid.sort();
            return Err(format!("{path}: unknown key {key:?}; valid keys: {}", valid.join(", ")));
        }
        let text = match value {
            toml::Value::String(s) => s,
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Float(f) => f.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            toml::Value::Array(a) => a
                .iter()
                .map(|v| match v {
                    toml::Value::String(s) => s.clone(),
                    toml::Value::Integer(i) => i.to_string(),
                    other => format!("{other:?}"),
                })
                .collect::<Vec<_>>()
                .join(","),
            other => return Err(format!("{path}: key {key:?} has a value of an unsupported type: {other:?}")),
        };
        if let Ok(mut f) = FROM_FILE.lock() {
            f.push(id.clone());
        }
        cmd = cmd.mut_arg(id, |a| a.default_value(text));
    }
    Ok(cmd)
}

/// `--print-config`: every flag's value and its source, secrets masked. Returns true when printed.
pub fn print_if_asked(matches: &ArgMatches, cmd: &Command) -> bool {
    if !matches.get_flag("print_config") {
        return false;
    }
    for a in cmd.get_arguments() {
        let id = a.get_id().as_str();
        if matches!(id, "config" | "print_config" | "help" | "version") || a.get_long().is_none() {
            continue;
        }
        let Some(values) = matches.get_raw(id) else { continue };
        let joined: Vec<String> = values.map(|v| v.to_string_lossy().to_string()).collect();
        let value = if SECRETS.contains(&id) { "********".to_string() } else { joined.join(",") };
        let source = match matches.value_source(id) {
            Some(ValueSource::CommandLine) => "flag",
            Some(ValueSource::EnvVariable) => "env",
            Some(ValueSource::DefaultValue) if FROM_FILE.lock().is_ok_and(|f| f.iter().any(|x| x == id)) => "--config",
            Some(ValueSource::DefaultValue) => "default",
            _ => "",
        };
        println!("{:<22} = {:<40} # {source}", a.get_long().unwrap_or(id), format!("{value:?}"));
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct T {
        #[arg(long, env = "TESSERA_TEST_CFG_TIMEOUT", default_value = "3s")]
        node_timeout: String,
        #[arg(long)]
        allow_command: bool,
        #[arg(long)]
        token: Option<String>,
    }

    #[test]
    fn file_values_are_defaults_under_flags() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("c.toml");
        std::fs::write(&f, "node-timeout = \"5s\"\nallow-command = true\ntoken = \"secret\"\n").expect("write");
        let cmd = apply(T::command(), &f.display().to_string()).expect("valid");
        let m = cmd.clone().get_matches_from(["t"]);
        let t = T::from_arg_matches(&m).expect("parse");
        assert_eq!((t.node_timeout.as_str(), t.allow_command, t.token.as_deref()), ("5s", true, Some("secret")));
        let m = cmd.get_matches_from(["t", "--node-timeout", "7s"]);
        assert_eq!(T::from_arg_matches(&m).expect("parse").node_timeout, "7s", "a flag beats the file");

        std::fs::write(&f, "node-timout = \"5s\"\n").expect("write");
        let e = apply(T::command(), &f.display().to_string()).expect_err("typo");
        assert!(e.contains("unknown key \"node-timout\"") && e.contains("node-timeout"), "{e}");
        std::fs::write(&f, "node-timeout = \n").expect("write");
        assert!(apply(T::command(), &f.display().to_string()).expect_err("bad toml").contains("invalid TOML"));
    }
}
