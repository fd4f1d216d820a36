//! Human-readable sizes and durations: parsing, formatting and serde glue.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};
use serde::ser::{self, Serializer};
use serde::{Deserialize, Serialize};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const GIB: u64 = 1024 * MIB;

/// What a size value must look like; used in error messages.
const SIZE_FORM: &str =
    r#"a size like "64KiB", "4MiB" or a plain integer of bytes (units: B, KiB, MiB, GiB)"#;
/// What a duration value must look like; used in error messages.
const DURATION_FORM: &str = r#"a duration like "10s" or "500ms" (units: ms, s, m, h)"#;

/// A number of bytes, written in configuration files either as a plain
/// integer (`1048576`) or as a string with a unit (`"1MiB"`).
///
/// Accepted units, all 1024-based: `B`; `KiB`, `KB`, `K`, `k`; `MiB`, `MB`,
/// `M`; `GiB`, `GB`, `G`. Spaces between the number and the unit are
/// allowed; a string without a unit is rejected (write a plain integer
/// instead). [`Display`](fmt::Display) writes the largest unit that
/// divides the value exactly (`"1MiB"`, `"1536KiB"`, `"100B"`), which
/// [`FromStr`] reads back unchanged.
///
/// ```
/// use halfsync_config::ByteSize;
/// let size: ByteSize = "4MiB".parse().unwrap();
/// assert_eq!(size, ByteSize(4 * 1024 * 1024));
/// assert_eq!(size.to_string(), "4MiB");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ByteSize(pub u64);

/// A [`Duration`] written in configuration files as a string with an
/// explicit unit: `"<integer><unit>"` with unit `ms`, `s`, `m` or `h`
/// (`"500ms"`, `"10s"`, `"2m"`, `"1h"`). Bare integers are rejected so the
/// unit is never ambiguous.
///
/// [`Display`](fmt::Display) writes the largest unit that divides the value
/// exactly; precision below a millisecond is not representable and is
/// truncated by `Display` (and refused by serialization).
///
/// ```
/// use halfsync_config::HumanDuration;
/// use std::time::Duration;
/// let d: HumanDuration = "90s".parse().unwrap();
/// assert_eq!(d.0, Duration::from_secs(90));
/// assert_eq!(d.to_string(), "90s");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct HumanDuration(pub Duration);

/// Why a size or duration string was rejected. The message is one line and
/// says what form was expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct UnitError(String);

/// Splits `"<digits><spaces?><unit>"` (spaces around it are ignored, as
/// between number and unit); `None` if there are no leading digits.
fn split_number(s: &str) -> Option<(&str, &str)> {
    let s = s.trim_matches(' ');
    let end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    if end == 0 {
        return None;
    }
    let (digits, rest) = s.split_at(end);
    Some((digits, rest.trim_start_matches(' ')))
}

impl FromStr for ByteSize {
    type Err = UnitError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || UnitError(format!("invalid size {s:?}: expected {SIZE_FORM}"));
        let (digits, unit) = split_number(s).ok_or_else(bad)?;
        let multiplier = match unit {
            "B" => 1,
            "KiB" | "KB" | "K" | "k" => KIB,
            "MiB" | "MB" | "M" => MIB,
            "GiB" | "GB" | "G" => GIB,
            _ => return Err(bad()),
        };
        digits
            .parse::<u64>()
            .ok()
            .and_then(|n| n.checked_mul(multiplier))
            .map(ByteSize)
            .ok_or_else(|| UnitError(format!("size {s:?} is too large")))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0;
        for (unit, mult) in [("GiB", GIB), ("MiB", MIB), ("KiB", KIB)] {
            if n != 0 && n.is_multiple_of(mult) {
                return write!(f, "{}{unit}", n / mult);
            }
        }
        write!(f, "{n}B")
    }
}

impl FromStr for HumanDuration {
    type Err = UnitError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || UnitError(format!("invalid duration {s:?}: expected {DURATION_FORM}"));
        let (digits, unit) = split_number(s).ok_or_else(bad)?;
        let millis_per_unit: u64 = match unit {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            _ => return Err(bad()),
        };
        digits
            .parse::<u64>()
            .ok()
            .and_then(|n| n.checked_mul(millis_per_unit))
            .filter(|&ms| ms <= MAX_DURATION_MS)
            .map(|ms| HumanDuration(Duration::from_millis(ms)))
            .ok_or_else(|| {
                UnitError(format!(
                    "duration {s:?} is too large: at most 100 years (\"876000h\"); where a \
                     setting allows it, \"0s\" means never"
                ))
            })
    }
}

/// The longest duration a config may give: 100 years. Every timer then
/// fits in a u64 of nanoseconds (up to ~584 years) and in an `Instant`
/// (a longer `idle_timeout` wrapped around to about a second).
const MAX_DURATION_MS: u64 = 876_000 * 3_600_000;

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Durations above u64::MAX milliseconds cannot come from a config.
        let ms = u64::try_from(self.0.as_millis()).unwrap_or(u64::MAX);
        for (unit, per) in [("h", 3_600_000), ("m", 60_000), ("s", 1_000)] {
            if ms != 0 && ms % per == 0 {
                return write!(f, "{}{unit}", ms / per);
            }
        }
        if ms == 0 {
            return f.write_str("0s");
        }
        write!(f, "{ms}ms")
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(SIZE_FORM)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ByteSize, E> {
                u64::try_from(v)
                    .map(ByteSize)
                    .map_err(|_| E::custom(format!("invalid size {v}: must not be negative")))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ByteSize, E> {
                v.parse().map_err(E::custom)
            }
        }
        deserializer.deserialize_any(V)
    }
}

impl Serialize for HumanDuration {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if !self.0.subsec_nanos().is_multiple_of(1_000_000) {
            return Err(ser::Error::custom(format!(
                "duration {:?} has sub-millisecond precision, which the config format cannot express",
                self.0
            )));
        }
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = HumanDuration;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(DURATION_FORM)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<HumanDuration, E> {
                v.parse().map_err(E::custom)
            }
        }
        deserializer.deserialize_str(V)
    }
}

/// `#[serde(with = "...")]` module for a [`Duration`] field.
pub(crate) mod duration {
    use super::*;

    pub(crate) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        HumanDuration(*d).serialize(s)
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        HumanDuration::deserialize(d).map(|h| h.0)
    }
}

/// Serializes a byte count as a [`ByteSize`] string.
pub(crate) fn serialize_size<S: Serializer, T: Copy + Into<u64>>(
    v: &T,
    s: S,
) -> Result<S::Ok, S::Error> {
    ByteSize((*v).into()).serialize(s)
}

/// Deserializes a [`ByteSize`] and checks it lies in `min..=max` bytes.
pub(crate) fn size_in<'de, D: Deserializer<'de>>(
    d: D,
    min: u64,
    max: u64,
) -> Result<u64, D::Error> {
    let ByteSize(v) = ByteSize::deserialize(d)?;
    if v < min {
        return Err(de::Error::custom(format!(
            "{} is too small: must be at least {}",
            ByteSize(v),
            ByteSize(min)
        )));
    }
    if v > max {
        return Err(de::Error::custom(format!(
            "{} is too large: must be at most {}",
            ByteSize(v),
            ByteSize(max)
        )));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        let cases = [
            ("0B", 0),
            ("12B", 12),
            ("4KiB", 4096),
            ("4 KiB", 4096),
            (" 4KiB ", 4096),
            ("4k", 4096),
            ("4K", 4096),
            ("4KB", 4096),
            ("1MiB", MIB),
            ("1M", MIB),
            ("1MB", MIB),
            ("2GiB", 2 * GIB),
            ("2G", 2 * GIB),
            ("2GB", 2 * GIB),
        ];
        for (s, want) in cases {
            assert_eq!(s.parse::<ByteSize>(), Ok(ByteSize(want)), "{s}");
        }
    }

    #[test]
    fn sizes_reject() {
        for s in [
            "", "MiB", "4", "4 ", "4mib", "4TiB", "-4KiB", "\t4KiB", "1.5MiB", "4 K iB",
        ] {
            let err = s.parse::<ByteSize>().unwrap_err().to_string();
            assert!(err.contains("expected a size like"), "{s}: {err}");
        }
        let err = "99999999999999999999GiB".parse::<ByteSize>().unwrap_err();
        assert!(err.to_string().contains("too large"), "{err}");
        let err = "17179869184GiB".parse::<ByteSize>().unwrap_err();
        assert!(err.to_string().contains("too large"), "{err}");
    }

    #[test]
    fn sizes_display_round_trip() {
        for v in [
            0,
            1,
            12,
            1000,
            1024,
            1536,
            4096,
            MIB,
            3 * MIB + 1,
            GIB,
            5 * GIB,
            u64::MAX,
        ] {
            let text = ByteSize(v).to_string();
            assert_eq!(text.parse::<ByteSize>(), Ok(ByteSize(v)), "{text}");
        }
        assert_eq!(ByteSize(MIB).to_string(), "1MiB");
        assert_eq!(ByteSize(1536).to_string(), "1536B");
        assert_eq!(ByteSize(6 * KIB).to_string(), "6KiB");
        assert_eq!(ByteSize(0).to_string(), "0B");
    }

    #[test]
    fn durations_parse() {
        let cases = [
            ("0s", 0),
            ("0ms", 0),
            ("500ms", 500),
            ("10s", 10_000),
            ("2m", 120_000),
            ("1h", 3_600_000),
            ("10 s", 10_000),
            (" 1s", 1_000),
            ("1s ", 1_000),
        ];
        for (s, ms) in cases {
            assert_eq!(
                s.parse::<HumanDuration>(),
                Ok(HumanDuration(Duration::from_millis(ms))),
                "{s}"
            );
        }
    }

    #[test]
    fn durations_reject() {
        for s in [
            "", "10", "s", "10S", "1.5s", "-1s", "10sec", "1d", "10us", "\t1s", " ",
        ] {
            let err = s.parse::<HumanDuration>().unwrap_err().to_string();
            assert!(
                err.contains(r#"expected a duration like "10s" or "500ms""#),
                "{s}: {err}"
            );
        }
        for huge in ["99999999999999999999h", "18446744074s", "876001h"] {
            let err = huge.parse::<HumanDuration>().unwrap_err();
            assert!(
                err.to_string().contains("too large: at most 100 years"),
                "{err}"
            );
        }
        assert!("876000h".parse::<HumanDuration>().is_ok());
    }

    #[test]
    fn durations_display_round_trip() {
        for ms in [
            0,
            1,
            999,
            1000,
            1500,
            60_000,
            90_000,
            3_600_000,
            7_200_000,
            MAX_DURATION_MS,
        ] {
            let d = HumanDuration(Duration::from_millis(ms));
            let text = d.to_string();
            assert_eq!(text.parse::<HumanDuration>(), Ok(d), "{text}");
        }
        assert_eq!(HumanDuration(Duration::from_secs(90)).to_string(), "90s");
        assert_eq!(HumanDuration(Duration::from_secs(120)).to_string(), "2m");
        assert_eq!(HumanDuration(Duration::ZERO).to_string(), "0s");
    }
}
