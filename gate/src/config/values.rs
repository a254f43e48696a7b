//! The types settings take, each parsed once at the edge (a flag, a variable or the file) and
//! rendered back as TOML for `print-config`.

use serde::{Deserialize, Serialize};
use std::fmt::Write as _;
use std::net::SocketAddr;

/// A value a setting can hold: parsed from a flag or an environment variable, read from the
/// TOML file through serde, and written back as TOML.
pub trait SettingValue: Sized {
    /// Parses the text of a flag or an environment variable; the error says what is accepted.
    fn parse_setting(text: &str) -> Result<Self, String>;
    /// The value as TOML writes it.
    fn to_toml(&self) -> String;
    /// The value as `--help` shows it.
    fn to_help(&self) -> String {
        self.to_toml().trim_matches('"').replace('_', "")
    }
}

impl SettingValue for u32 {
    fn parse_setting(text: &str) -> Result<u32, String> {
        text.trim().replace('_', "").parse().map_err(|_| "not a whole number from 0 to 4294967295".into())
    }
    fn to_toml(&self) -> String {
        group_digits(*self)
    }
}

impl SettingValue for bool {
    fn parse_setting(text: &str) -> Result<bool, String> {
        match text.trim().to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" | "on" => Ok(true),
            "false" | "0" | "no" | "off" => Ok(false),
            _ => Err("must be true or false".into()),
        }
    }
    fn to_toml(&self) -> String {
        self.to_string()
    }
}

impl SettingValue for String {
    fn parse_setting(text: &str) -> Result<String, String> {
        Ok(text.to_string())
    }
    fn to_toml(&self) -> String {
        toml_quote(self)
    }
}

impl SettingValue for SocketAddr {
    fn parse_setting(text: &str) -> Result<SocketAddr, String> {
        text.trim()
            .parse()
            .map_err(|_| "not an IP address and port (e.g. 0.0.0.0:7100, [::]:7100, 127.0.0.1:0)".into())
    }
    fn to_toml(&self) -> String {
        toml_quote(&self.to_string())
    }
}

/// A secret: never shown by `Debug`, so a logged configuration cannot leak it.
#[derive(Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self.0.as_str() {
            "" | super::DEV_SECRET => "<development secret>",
            _ => "<set>",
        })
    }
}

impl SettingValue for Secret {
    fn parse_setting(text: &str) -> Result<Secret, String> {
        Ok(Secret(text.to_string()))
    }
    fn to_toml(&self) -> String {
        toml_quote(&self.0)
    }
    fn to_help(&self) -> String {
        "the built-in development secret".into()
    }
}

/// Which cores shards run on: every core this process may use, or a list.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Cores {
    /// One shard per core this process may use.
    #[default]
    All,
    /// These cores, in this order.
    List(Vec<usize>),
}

impl TryFrom<String> for Cores {
    type Error = String;
    fn try_from(s: String) -> Result<Cores, String> {
        Cores::parse_setting(&s)
    }
}

impl From<Cores> for String {
    fn from(c: Cores) -> String {
        match c {
            Cores::All => "all".into(),
            Cores::List(list) => list.iter().map(usize::to_string).collect::<Vec<_>>().join(","),
        }
    }
}

impl SettingValue for Cores {
    /// `"all"`, a core `"0"`, a range `"0-1"` or a comma-separated list of either (`"0,2-3"`).
    /// Whether the cores exist is checked against the machine later (`Config::resolved_cores`).
    fn parse_setting(text: &str) -> Result<Cores, String> {
        let spec = text.trim();
        if spec.eq_ignore_ascii_case("all") {
            return Ok(Cores::All);
        }
        if spec.is_empty() {
            return Err("empty; use \"all\", a core \"0\", a range \"0-1\" or a list \"0,2\"".into());
        }
        let number = |t: &str, part: &str| {
            t.trim().parse::<usize>().map_err(|_| format!("{part:?} is not a core number or a range"))
        };
        let mut cores = Vec::new();
        for part in spec.split(',') {
            let part = part.trim();
            let (first, last) = match part.split_once('-') {
                Some((a, b)) => (number(a, part)?, number(b, part)?),
                None => {
                    let c = number(part, part)?;
                    (c, c)
                }
            };
            if first > last {
                return Err(format!("range {part} runs backwards; write {last}-{first}"));
            }
            // Bounded: no machine has this many cores, and a typo must not allocate gigabytes.
            if last >= MAX_CORE {
                return Err(format!(
                    "core {last} is past the largest core number accepted ({})",
                    MAX_CORE - 1
                ));
            }
            for core in first..=last {
                if cores.contains(&core) {
                    return Err(format!("core {core} is listed twice"));
                }
                cores.push(core);
            }
        }
        Ok(Cores::List(cores))
    }
    fn to_toml(&self) -> String {
        toml_quote(&String::from(self.clone()))
    }
}

/// Largest core number a list may name, plus one.
const MAX_CORE: usize = 4096;

/// Defines a settings enum: its variants, their names in TOML and on the command line, and a
/// sentence about each for the help.
macro_rules! setting_enum {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident = $text:literal,)* }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
        #[serde(rename_all = "lowercase")]
        pub enum $name {
            $($(#[$vdoc])* $variant,)*
        }

        impl $name {
            /// Every value, in order.
            pub const ALL: &'static [$name] = &[$($name::$variant),*];

            /// The name used in the TOML file and on the command line.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text,)*
                }
            }
        }

        impl SettingValue for $name {
            fn parse_setting(text: &str) -> Result<$name, String> {
                let t = text.trim();
                $name::ALL.iter().copied().find(|v| v.as_str().eq_ignore_ascii_case(t)).ok_or_else(|| {
                    format!("must be one of {}", $name::ALL.iter().map(|v| v.as_str()).collect::<Vec<_>>().join("|"))
                })
            }
            fn to_toml(&self) -> String {
                toml_quote(self.as_str())
            }
        }
    };
}

setting_enum! {
    /// What the gate forwards of the GPS points it receives.
    GpsForward {
        /// Only each driver's newest point per flush: the app-server sees current positions at a
        /// fraction of the traffic.
        #[default]
        Latest = "latest",
        /// Every point received, in arrival order, for app-servers that record tracks.
        All = "all",
    }
}

setting_enum! {
    /// How the app port does its I/O.
    AppIo {
        /// glommio's readiness path: a task per connection, a poll armed per read.
        Readiness = "readiness",
        /// The shard's own io_uring: multishot accept and receive into a provided-buffer ring,
        /// sends submitted together; a connection is a table entry, not a task.
        #[default]
        Uring = "uring",
    }
}

setting_enum! {
    /// Least severe level logged.
    LogLevel {
        /// Failures only.
        Error = "error",
        /// Failures and warnings.
        Warn = "warn",
        /// One line per hop of each flow (the default).
        #[default]
        Info = "info",
        /// Also every push hop per target and GPS.
        Debug = "debug",
        /// Everything.
        Trace = "trace",
    }
}

setting_enum! {
    /// Log line format.
    LogFormat {
        /// `key=value` lines for people and grep.
        #[default]
        Text = "text",
        /// JSON objects for log collectors.
        Json = "json",
    }
}

/// A TOML basic string.
pub fn toml_quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04X}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// `1048576` as `1_048_576`, which TOML accepts and people read at a glance.
pub fn group_digits(value: u32) -> String {
    let digits = value.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push('_');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_digits_groups_by_three() {
        assert_eq!(group_digits(0), "0");
        assert_eq!(group_digits(999), "999");
        assert_eq!(group_digits(1_000), "1_000");
        assert_eq!(group_digits(1_048_576), "1_048_576");
        assert_eq!(group_digits(u32::MAX), "4_294_967_295");
    }

    #[test]
    fn cores_accept_every_form_and_refuse_bad_lists() {
        assert_eq!(Cores::parse_setting("all"), Ok(Cores::All));
        assert_eq!(Cores::parse_setting(" 0, 2-3 "), Ok(Cores::List(vec![0, 2, 3])));
        for bad in ["", "x", "3-1", "0,0", "1-2,2", "99999999999"] {
            assert!(Cores::parse_setting(bad).is_err(), "{bad:?}");
        }
        assert_eq!(String::from(Cores::List(vec![1, 0])), "1,0");
    }

    #[test]
    fn enums_parse_their_names_only() {
        assert_eq!(LogLevel::parse_setting("DEBUG"), Ok(LogLevel::Debug));
        assert_eq!(GpsForward::parse_setting("all"), Ok(GpsForward::All));
        let e = LogFormat::parse_setting("yaml").unwrap_err();
        assert!(e.contains("text|json"), "{e}");
    }

    #[test]
    fn numbers_and_addresses_say_what_is_accepted() {
        assert_eq!(u32::parse_setting("1_000"), Ok(1000));
        assert!(u32::parse_setting("-1").is_err());
        assert!(SocketAddr::parse_setting("localhost").unwrap_err().contains("IP address and port"));
        assert_eq!(format!("{:?}", Secret("s3cret".into())), "<set>");
    }
}
