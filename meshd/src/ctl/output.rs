//! Output of every command: `-o table|json|yaml`, and colour that honours `NO_COLOR`.

use std::io::Write;

use clap::ValueEnum;
use serde::Serialize;

use super::CtlError;

/// `-o` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// Human-readable tables and lines.
    Table,
    /// One JSON document.
    Json,
    /// One YAML document.
    Yaml,
}

/// Writes `value` as JSON or YAML, or calls `table` for the human form.
pub(super) fn emit<T: Serialize, W: Write, E>(
    out: &mut W,
    format: OutputFormat,
    value: &T,
    table: impl FnOnce(&mut W) -> Result<(), E>,
) -> Result<(), CtlError>
where
    CtlError: From<E>,
{
    match format {
        OutputFormat::Table => table(out)?,
        OutputFormat::Json => {
            serde_json::to_writer_pretty(&mut *out, value)?;
            writeln!(out)?;
        }
        OutputFormat::Yaml => {
            let text = serde_saphyr::to_string(value)
                .map_err(|e| CtlError::Up(format!("encoding YAML output: {e}")))?;
            out.write_all(text.as_bytes())?;
            if !text.ends_with('\n') {
                writeln!(out)?;
            }
        }
    }
    Ok(())
}

/// Good / bad / warning words in tables. The binary writes through `anstream`, which drops
/// these escapes when stdout is not a terminal or `NO_COLOR` is set.
pub(super) fn good(text: &str) -> String {
    paint(text, anstyle::AnsiColor::Green)
}

/// See [`good`].
pub(super) fn bad(text: &str) -> String {
    paint(text, anstyle::AnsiColor::Red)
}

/// See [`good`].
pub(super) fn warn(text: &str) -> String {
    paint(text, anstyle::AnsiColor::Yellow)
}

fn paint(text: &str, color: anstyle::AnsiColor) -> String {
    let style = anstyle::Style::new().fg_color(Some(color.into())).bold();
    format!("{style}{text}{style:#}")
}
