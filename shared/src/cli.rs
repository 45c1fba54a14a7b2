//! The `main` every tool shares: error printing, exit codes, quiet broken pipe,
//! no backtraces on input, and a progress bar that only shows on a terminal.

use crate::error::{Error, Result};
use std::io::{self, IsTerminal, Write};
use std::path::Path;

/// Parse the command line; a usage error becomes one line
/// `name: error: <what>; see 'name --help'` and exit 2, like every other
/// error (clap's own report spans several lines). --help and --version
/// print as usual and exit 0.
pub fn parse_args<T: clap::Parser>(name: &'static str) -> T {
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if let Some(m) = mistyped_subcommand(&T::command(), &argv) {
        let _ = writeln!(io::stderr(), "{name}: error: {m}; see '{name} --help'");
        std::process::exit(2)
    }
    match T::try_parse() {
        Ok(a) => a,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                e.exit()
            }
            if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
                // An exit-2 run is one line like every other usage error; the
                // subcommands are named so the next try needs no --help.
                let cmd = T::command();
                let subs: Vec<&str> = cmd
                    .get_subcommands()
                    .map(|s| s.get_name())
                    .filter(|n| *n != "help")
                    .collect();
                let _ = writeln!(
                    io::stderr(),
                    "{name}: error: a subcommand is required: {}; see '{name} --help'",
                    subs.join(", ")
                );
                std::process::exit(2)
            }
            let _ = writeln!(
                io::stderr(),
                "{name}: error: {}",
                usage_line(&e.to_string(), name)
            );
            std::process::exit(2)
        }
    }
}

/// A first argument that is no subcommand and no existing file but close to
/// a subcommand's name (`fed-aggregate merg a b`): clap would read it as the
/// tool's positional input and report something unrelated ("cannot open
/// merg", "the subcommand 'a' cannot be used with '[MANIFEST]'").
pub fn mistyped_subcommand(cmd: &clap::Command, argv: &[std::ffi::OsString]) -> Option<String> {
    let first = argv.get(1)?.to_str()?;
    if first.starts_with('-') || first.contains(['/', '.']) || Path::new(first).exists() {
        return None;
    }
    let names: Vec<&str> = cmd
        .get_subcommands()
        .flat_map(|s| std::iter::once(s.get_name()).chain(s.get_all_aliases()))
        .collect();
    if names.is_empty() || names.contains(&first) {
        return None;
    }
    let s = crate::suggest::suggest(first, &names)?;
    Some(format!(
        "unknown subcommand '{first}'; did you mean '{s}'? (no input file of that name exists either)"
    ))
}

/// clap's report in one line: its `error:` sentence plus any `tip:`.
pub fn usage_line(report: &str, name: &str) -> String {
    let mut what = String::new();
    let mut tips = Vec::new();
    // "error: ...:" is followed by indented items (the missing arguments).
    let mut items = false;
    for line in report.lines().map(str::trim) {
        if let Some(m) = line.strip_prefix("error: ") {
            what = m.to_string();
            items = what.ends_with(':');
        } else if let Some(t) = line.strip_prefix("tip: ") {
            tips.push(t.to_string());
        } else if items && !line.is_empty() {
            what.push(' ');
            what.push_str(line);
        } else {
            items = false;
        }
    }
    if what.is_empty() {
        what = report
            .lines()
            .next()
            .unwrap_or("bad usage")
            .trim()
            .to_string();
    }
    let mut out = what;
    for t in tips {
        out.push_str(&format!(" ({t})"));
    }
    out.push_str(&format!("; see '{name} --help'"));
    out
}

/// A message as one line: control characters (a newline echoed back from
/// the input, say) are written as escapes, so every error stays one line.
pub fn one_line(m: &str) -> String {
    m.chars()
        .flat_map(|c| {
            if c.is_control() {
                c.escape_default().collect::<Vec<_>>()
            } else {
                vec![c]
            }
        })
        .collect()
}

/// Run a tool's body and turn its result into the process exit code.
///
/// Prints `name: error: <message>` on stderr for errors. A broken pipe exits 0.
/// A panic (a bug, never expected on bad input) prints one line, not a backtrace,
/// and exits 101 so scripts see it is not an input problem.
pub fn main_with(name: &'static str, body: impl FnOnce() -> Result<()>) -> ! {
    crate::signals::set_tool_name(name);
    std::panic::set_hook(Box::new(move |info| {
        let msg = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        let loc = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        let _ = writeln!(
            io::stderr(),
            "{name}: internal error: {msg}{loc} (this is a bug; please report it)"
        );
    }));
    let code = match body() {
        Ok(()) => 0,
        Err(e) => {
            match &e {
                Error::BrokenPipe => {}
                // A negative answer is a result, not a failure of the tool.
                Error::Negative(m) => {
                    let _ = writeln!(io::stderr(), "{name}: {}", one_line(m));
                }
                _ => {
                    let _ = writeln!(
                        io::stderr(),
                        "{name}: {}: {}",
                        e.prefix(),
                        one_line(&e.to_string())
                    );
                }
            }
            e.exit_code()
        }
    };
    std::process::exit(code)
}

static QUIET: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// `--quiet`: no progress bars for the rest of the process.
pub fn set_quiet() {
    QUIET.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// A progress bar on stderr when stderr is a terminal; hidden otherwise (and
/// under `--quiet`), so logs and pipelines stay clean.
pub fn progress(len: u64, what: &str) -> indicatif::ProgressBar {
    if !io::stderr().is_terminal()
        || std::env::var_os("FTK_NO_PROGRESS").is_some()
        || QUIET.load(std::sync::atomic::Ordering::Relaxed)
    {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(len);
    let style = indicatif::ProgressStyle::with_template(
        "{msg} [{bar:30}] {pos}/{len} ({elapsed}, eta {eta})",
    )
    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
    bar.set_style(style.progress_chars("=> "));
    bar.set_message(what.to_string());
    bar
}

/// A buffered, locked stdout whose write errors map to ftk errors
/// (broken pipe becomes a quiet exit 0).
pub struct Stdout {
    inner: io::BufWriter<io::StdoutLock<'static>>,
}

impl Stdout {
    pub fn new() -> Self {
        Stdout {
            inner: io::BufWriter::with_capacity(64 * 1024, io::stdout().lock()),
        }
    }

    /// Write a line of text.
    pub fn line(&mut self, s: &str) -> Result<()> {
        self.inner
            .write_all(s.as_bytes())
            .and_then(|_| self.inner.write_all(b"\n"))
            .map_err(Error::stdout)
    }

    /// Flush; call at the end of a tool (and after each record when streaming
    /// to a terminal or a live pipe consumer matters).
    pub fn flush(&mut self) -> Result<()> {
        self.inner.flush().map_err(Error::stdout)
    }
}

impl Default for Stdout {
    fn default() -> Self {
        Self::new()
    }
}

impl Write for Stdout {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.inner.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}
