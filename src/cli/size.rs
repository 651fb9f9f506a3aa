//! Human sizes on the command line and in the config file.
//!
//! A size is a number of bytes, optionally with a fraction, followed by an
//! optional unit. Every unit is a power of 1024, whatever its spelling:
//! `K`, `Ki`, `KiB` and `KB` all mean 1024 bytes (as in systemd's and
//! Docker's options); the letter is case-insensitive (`512m` = `512M`).
//! Units: `B`, `K`, `M`, `G`, `T`, `P`, `E`. Examples: `4096`, `512M`,
//! `10G`, `1Ti`, `1.5GiB`. A fraction needs a unit and is rounded down to
//! whole bytes. No spaces, no signs.
//!
//! [`SizeOrPercent`] also accepts a percentage (`10%`, `2.5%`, from 0 to 100)
//! for options that are relative to something else, e.g. `--min-free`, which
//! is a share of the file system's size.
//!
//! In the config file a size is either a TOML integer (bytes) or a string in
//! the syntax above.

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;
use std::fmt;
use std::str::FromStr;

/// A number of bytes given as `512M`, `10G`, `1Ti` or plain `4096`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Size(pub u64);

/// A size, or a percentage of something the option defines.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum SizeOrPercent {
    Bytes(u64),
    /// From 0 to 100 inclusive.
    Percent(f64),
}

impl SizeOrPercent {
    /// The cache's watermark for this value.
    pub fn min_free(self) -> blobmgr::cache::MinFree {
        match self {
            SizeOrPercent::Bytes(n) => blobmgr::cache::MinFree::Bytes(n),
            SizeOrPercent::Percent(p) => blobmgr::cache::MinFree::Percent(p),
        }
    }
}

/// Why a string is not a size; its message names the string and the syntax.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SizeError {
    input: String,
    why: &'static str,
}

impl fmt::Display for SizeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?} is not a size ({})", self.input, self.why)
    }
}

impl std::error::Error for SizeError {}

const SYNTAX: &str = "use bytes or a K, M, G or T suffix, powers of 1024: 4096, 512M, 10G, 1Ti";

fn error(input: &str, why: &'static str) -> SizeError {
    SizeError {
        input: input.to_string(),
        why,
    }
}

/// Bytes per unit: a letter (`K` to `E`), optionally followed by `i`, `iB`
/// or `B`; or no unit, or `B` alone, for bytes.
fn unit_multiplier(unit: &str) -> Option<u64> {
    let lower = unit.to_ascii_lowercase();
    if lower.is_empty() || lower == "b" {
        return Some(1);
    }
    let mut chars = lower.chars();
    let letter = chars.next()?;
    if !matches!(chars.as_str(), "" | "i" | "ib" | "b") {
        return None;
    }
    let shift = match letter {
        'k' => 10,
        'm' => 20,
        'g' => 30,
        't' => 40,
        'p' => 50,
        'e' => 60,
        _ => return None,
    };
    Some(1u64 << shift)
}

/// Parses a size in bytes (see the module docs for the syntax).
pub fn parse_size(s: &str) -> Result<u64, SizeError> {
    let digits_end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(digits_end);
    if number.is_empty() {
        return Err(error(s, SYNTAX));
    }
    let mult = unit_multiplier(unit).ok_or_else(|| error(s, SYNTAX))?;
    let (whole, frac) = match number.split_once('.') {
        Some((w, f)) => (w, f),
        None => (number, ""),
    };
    if whole.is_empty() || frac.contains('.') || (number.contains('.') && frac.is_empty()) {
        return Err(error(s, SYNTAX));
    }
    if !frac.is_empty() && mult == 1 {
        return Err(error(s, "a fraction of a byte"));
    }
    let too_large = || error(s, "too large");
    let whole: u64 = whole.parse().map_err(|_| too_large())?;
    let mut bytes = whole.checked_mul(mult).ok_or_else(too_large)?;
    if !frac.is_empty() {
        // frac / 10^len of the unit, in integers: the first 18 digits count.
        let frac = &frac[..frac.len().min(18)];
        let num: u128 = frac.parse().map_err(|_| error(s, SYNTAX))?;
        let den = 10u128.pow(frac.len() as u32);
        let part = (num * mult as u128 / den) as u64;
        bytes = bytes.checked_add(part).ok_or_else(too_large)?;
    }
    Ok(bytes)
}

impl FromStr for Size {
    type Err = SizeError;
    fn from_str(s: &str) -> Result<Size, SizeError> {
        parse_size(s).map(Size)
    }
}

impl FromStr for SizeOrPercent {
    type Err = SizeError;
    fn from_str(s: &str) -> Result<SizeOrPercent, SizeError> {
        let Some(p) = s.strip_suffix('%') else {
            return parse_size(s).map(SizeOrPercent::Bytes);
        };
        let ok = !p.is_empty() && p.chars().all(|c| c.is_ascii_digit() || c == '.');
        match p.parse::<f64>() {
            Ok(v) if ok && (0.0..=100.0).contains(&v) => Ok(SizeOrPercent::Percent(v)),
            Ok(_) if ok => Err(error(s, "a percentage is from 0% to 100%")),
            _ => Err(error(s, "a percentage is a number followed by %, e.g. 10%")),
        }
    }
}

impl fmt::Display for Size {
    /// The largest unit that divides the size exactly: `512M`, `4096`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let units = [
            (60, "E"),
            (50, "P"),
            (40, "T"),
            (30, "G"),
            (20, "M"),
            (10, "K"),
        ];
        for (shift, u) in units {
            let m = 1u64 << shift;
            if self.0 != 0 && self.0.is_multiple_of(m) {
                return write!(f, "{}{u}", self.0 / m);
            }
        }
        write!(f, "{}", self.0)
    }
}

/// A size for people: `1.5 GiB`, `512 B`, with one decimal above KiB.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut v = bytes as f64 / 1024.0;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < UNITS.len() {
        v /= 1024.0;
        i += 1;
    }
    format!("{v:.1} {}", UNITS[i])
}

/// Accepts a TOML integer (bytes) or a string in the size syntax.
struct SizeVisitor<T>(std::marker::PhantomData<T>);

impl<T> Visitor<'_> for SizeVisitor<T>
where
    T: FromStr<Err = SizeError> + From<u64>,
{
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a size: a number of bytes or a string such as \"512M\"")
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<T, E> {
        u64::try_from(v)
            .map(T::from)
            .map_err(|_| E::custom(format!("{v} is not a size (negative)")))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<T, E> {
        Ok(T::from(v))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
        v.parse().map_err(E::custom)
    }
}

impl From<u64> for Size {
    fn from(v: u64) -> Size {
        Size(v)
    }
}

impl From<u64> for SizeOrPercent {
    fn from(v: u64) -> SizeOrPercent {
        SizeOrPercent::Bytes(v)
    }
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Size, D::Error> {
        d.deserialize_any(SizeVisitor(std::marker::PhantomData))
    }
}

impl<'de> Deserialize<'de> for SizeOrPercent {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<SizeOrPercent, D::Error> {
        d.deserialize_any(SizeVisitor(std::marker::PhantomData))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const K: u64 = 1024;
    const M: u64 = K * K;
    const G: u64 = K * M;
    const T: u64 = K * G;

    #[test]
    fn plain_bytes_and_every_spelling_of_a_unit() {
        let cases = [
            ("0", 0),
            ("4096", 4096),
            ("12B", 12),
            ("512M", 512 * M),
            ("512m", 512 * M),
            ("10G", 10 * G),
            ("1Ti", T),
            ("1TiB", T),
            ("1tib", T),
            ("2KB", 2 * K),
            ("2K", 2 * K),
            ("2Ki", 2 * K),
            ("3E", 3 << 60),
            ("1.5G", G + G / 2),
            ("0.5K", 512),
            ("1.0009765625K", 1025),
        ];
        for (s, want) in cases {
            assert_eq!(parse_size(s), Ok(want), "{s}");
            assert_eq!(s.parse::<Size>().unwrap(), Size(want), "{s}");
        }
    }

    #[test]
    fn bad_sizes_name_themselves() {
        for s in [
            "", "12Q", "M", "-1", "+1", "1 G", "1.5", "1..5G", ".5G", "5.G", "1Bi", "1iB", "1i",
            "G1", "0x10", "1e3",
        ] {
            let e = parse_size(s).expect_err(s).to_string();
            assert!(e.starts_with(&format!("{s:?} is not a size")), "{s}: {e}");
        }
        let e = parse_size("12Q").unwrap_err().to_string();
        assert!(e.contains("512M"), "the error shows the syntax: {e}");
    }

    #[test]
    fn overflow_is_an_error_not_a_wrap() {
        assert_eq!(parse_size("16E").unwrap_err().why, "too large");
        assert_eq!(parse_size("18446744073709551615"), Ok(u64::MAX));
        assert_eq!(
            parse_size("18446744073709551616").unwrap_err().why,
            "too large"
        );
        assert_eq!(parse_size("15.99999999999999999999E").unwrap() >> 60, 15);
    }

    #[test]
    fn percentages() {
        assert_eq!("10%".parse(), Ok(SizeOrPercent::Percent(10.0)));
        assert_eq!("2.5%".parse(), Ok(SizeOrPercent::Percent(2.5)));
        assert_eq!("0%".parse(), Ok(SizeOrPercent::Percent(0.0)));
        assert_eq!("100%".parse(), Ok(SizeOrPercent::Percent(100.0)));
        assert_eq!("1G".parse(), Ok(SizeOrPercent::Bytes(G)));
        for bad in ["101%", "%", "-1%", "ten%", "1e1%", "10 %", "inf%", "NaN%"] {
            let e = bad.parse::<SizeOrPercent>().expect_err(bad).to_string();
            assert!(e.starts_with(&format!("{bad:?} is not a size")), "{e}");
        }
        use blobmgr::cache::MinFree;
        assert_eq!(
            SizeOrPercent::Percent(10.0).min_free(),
            MinFree::Percent(10.0)
        );
        assert_eq!(SizeOrPercent::Bytes(5).min_free(), MinFree::Bytes(5));
    }

    #[test]
    fn display_round_trips() {
        for n in [0, 1, 4095, 4096, 512 * M, 10 * G, T, 3 * T + K, u64::MAX] {
            let s = Size(n).to_string();
            assert_eq!(parse_size(&s), Ok(n), "{s}");
        }
        assert_eq!(Size(512 * M).to_string(), "512M");
        assert_eq!(human(1536), "1.5 KiB");
        assert_eq!(human(100), "100 B");
        assert_eq!(human(10 * G), "10.0 GiB");
    }

    #[test]
    fn toml_integers_and_strings() {
        #[derive(Deserialize)]
        struct C {
            a: Size,
            b: Size,
            c: SizeOrPercent,
        }
        let c: C = toml::from_str("a = 4096\nb = \"1Ti\"\nc = \"10%\"").unwrap();
        assert_eq!(
            (c.a, c.b, c.c),
            (Size(4096), Size(T), SizeOrPercent::Percent(10.0))
        );
        let e = toml::from_str::<C>("a = -1\nb = 1\nc = 1").err().unwrap();
        assert!(e.message().contains("not a size"), "{e}");
        let e = toml::from_str::<C>("a = 1\nb = \"12Q\"\nc = 1")
            .err()
            .unwrap();
        assert!(e.message().contains("\"12Q\" is not a size"), "{e}");
    }
}
