//! `understudy serve --config FILE`: a TOML file holding any of `serve`'s flags (docs/config.md).
//!
//! Keys are the flags' long names exactly as typed on the command line (kebab-case:
//! `cbw-memory`, `hello-timeout`, `data-dir`); values are strings or integers (`true`/`false`
//! for a flag that takes no value). The file never has its own schema: a key is valid if and
//! only if `serve` has a flag of that name, and its value goes through that flag's own parser,
//! so a flag added to `serve` is a config key at once and both always agree.
//!
//! Precedence: command line, then environment (`UNDERSTUDY_DATA_DIR`), then the file, then the
//! flag's default. This is done by appending `--key=value` to the arguments for each key the
//! command line and the environment left unset, and parsing once more.

use std::ffi::OsString;
use std::path::Path;

use anyhow::{anyhow, bail, Context};
use clap::parser::ValueSource;

/// The flag naming the file.
const CONFIG_FLAG: &str = "config";

/// Largest config file read: a config is a few hundred bytes; this only keeps a wrong path
/// (a disk image, /dev/zero) from being read into memory.
const CONFIG_MAX_BYTES: u64 = 1 << 20;

/// `argv` with the settings of `serve --config FILE` appended, or `argv` unchanged when the
/// command is not `serve --config` (or does not parse: the real parse reports that).
pub fn apply(cmd: clap::Command, argv: Vec<OsString>) -> anyhow::Result<Vec<OsString>> {
    // `--listen` may come from the file: not required on this first look.
    let cmd = cmd.mut_subcommand("serve", |s| s.mut_arg("listen", |a| a.required(false)));
    let Ok(matches) = cmd.clone().try_get_matches_from(argv.clone()) else {
        return Ok(argv);
    };
    let Some(("serve", serve)) = matches.subcommand() else {
        return Ok(argv);
    };
    let Some(path) = serve.get_one::<std::path::PathBuf>(CONFIG_FLAG) else {
        return Ok(argv);
    };
    let table = read(path)?;
    let Some(serve_cmd) = cmd.find_subcommand("serve") else {
        return Ok(argv);
    };
    let mut out = argv;
    for (key, value) in &table {
        let file = path.display();
        // Global flags (`--data-dir`) live on the top command, the rest on `serve`.
        let (arg, given) = match lookup(serve_cmd, key) {
            Some(arg) => (arg, serve.value_source(arg.get_id().as_str())),
            None => match lookup(&cmd, key).filter(|a| a.is_global_set()) {
                Some(arg) => (arg, matches.value_source(arg.get_id().as_str())),
                None => bail!("{file}: unknown key {key:?}{}", hint(serve_cmd, &cmd, key)),
            },
        };
        if matches!(
            given,
            Some(ValueSource::CommandLine) | Some(ValueSource::EnvVariable)
        ) {
            continue;
        }
        let takes_value = arg.get_action().takes_values();
        let text = match value {
            toml::Value::String(s) if takes_value => s.clone(),
            toml::Value::Integer(i) if takes_value => i.to_string(),
            toml::Value::Boolean(b) if !takes_value => {
                if *b {
                    out.push(format!("--{key}").into());
                }
                continue;
            }
            _ if takes_value => {
                bail!(
                    "{file}: {key} must be a string or an integer, not {}",
                    value.type_str()
                )
            }
            _ => bail!(
                "{file}: {key} must be true or false, not {}",
                value.type_str()
            ),
        };
        // The flag's own parser, so the file accepts exactly what the command line does;
        // its error, in one line, names the key and the file.
        let probe = clap::Command::new("understudy").no_binary_name(true).arg(
            clap::Arg::new("value")
                .long("value")
                .value_name("V")
                .value_parser(arg.get_value_parser().clone()),
        );
        if let Err(e) = probe.try_get_matches_from([format!("--value={text}")]) {
            let why = e.to_string();
            let why = why.lines().next().unwrap_or_default();
            let why = why.strip_prefix("error: ").unwrap_or(why);
            let why = why.replace(" for '--value <V>'", "");
            bail!("{file}: {key} = {text:?}: {why}");
        }
        out.push(format!("--{key}={text}").into());
    }
    Ok(out)
}

/// Reads and parses the file; a missing file named explicitly is an error.
fn read(path: &Path) -> anyhow::Result<toml::Table> {
    let file = path.display();
    let meta = std::fs::metadata(path).with_context(|| format!("config file {file}"))?;
    if meta.len() > CONFIG_MAX_BYTES {
        bail!(
            "config file {file}: {} bytes, more than a config can be ({CONFIG_MAX_BYTES})",
            meta.len()
        );
    }
    let text = std::fs::read_to_string(path).with_context(|| format!("config file {file}"))?;
    text.parse::<toml::Table>().map_err(|e| {
        let line = e
            .span()
            .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
        let msg = e.message().trim().replace('\n', " ");
        match line {
            Some(n) => anyhow!("config file {file}: line {n}: {msg}"),
            None => anyhow!("config file {file}: {msg}"),
        }
    })
}

/// The flag `key` names in `cmd` (never `--config` itself, nor help/version).
fn lookup<'a>(cmd: &'a clap::Command, key: &str) -> Option<&'a clap::Arg> {
    cmd.get_arguments().find(|a| {
        a.get_long() == Some(key)
            && !matches!(key, CONFIG_FLAG | "help" | "version")
            && (a.get_action().takes_values() || matches!(a.get_action(), clap::ArgAction::SetTrue))
    })
}

/// ", did you mean cbw-memory" for `cbw_memory`; the list of keys otherwise.
fn hint(serve: &clap::Command, top: &clap::Command, key: &str) -> String {
    let kebab = key.replace('_', "-");
    if kebab != key && (lookup(serve, &kebab).is_some() || lookup(top, &kebab).is_some()) {
        return format!(" (keys are written as the flags: {kebab})");
    }
    let keys: Vec<&str> = top
        .get_arguments()
        .filter(|a| a.is_global_set())
        .chain(serve.get_arguments().filter(|a| !a.is_hide_set()))
        .filter_map(|a| a.get_long())
        .filter(|l| lookup(serve, l).is_some() || lookup(top, l).is_some())
        .collect();
    format!(" (keys: {})", keys.join(", "))
}
