//! Property tests: `Config::from_toml` never panics, its errors are one line,
//! and whatever it accepts survives a round trip through `toml::to_string`.

use halfsync_config::{Config, EXAMPLE_CONFIG, Origin};
use proptest::prelude::*;
use proptest::sample::Index;

/// Parses `text` and checks the invariants that hold for every input.
fn check(text: &str) -> Result<(), TestCaseError> {
    match Config::from_toml(text, Origin::File("fuzz.toml".into())) {
        Ok(cfg) => {
            prop_assert!(!cfg.groups.is_empty());
            let out = toml::to_string(&cfg).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let again = Config::from_toml(&out, cfg.origin.clone());
            prop_assert!(again.is_ok(), "re-parse failed: {:?}\n{}", again, out);
            if let Ok(again) = again {
                // Plugin tables may hold NaN (never equal to itself): compare text.
                prop_assert_eq!(&again.server, &cfg.server);
                prop_assert_eq!(toml::to_string(&again).ok(), Some(out));
            }
        }
        Err(e) => {
            let shown = e.to_string();
            prop_assert!(
                !shown.contains('\n') && !shown.contains('\r'),
                "{:?}",
                shown
            );
            prop_assert!(shown.starts_with("fuzz.toml"), "{:?}", shown);
        }
    }
    Ok(())
}

#[derive(Debug, Clone)]
enum Edit {
    Delete(Index),
    Insert(Index, char),
    Replace(Index, char),
    DeleteLine(Index),
    DuplicateLine(Index),
    SwapLines(Index, Index),
}

fn interesting_char() -> impl Strategy<Value = char> {
    prop_oneof![
        3 => prop::sample::select(vec![
            '"', '\'', '[', ']', '{', '}', '=', ',', '.', '\n', '#', '\\', ' ', '0', '9', '-',
            '_', 's', 'm', 'K', 'i', 'B', '\u{0}', '\r', '\t', 'é',
        ]),
        1 => any::<char>(),
    ]
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        any::<Index>().prop_map(Edit::Delete),
        (any::<Index>(), interesting_char()).prop_map(|(i, c)| Edit::Insert(i, c)),
        (any::<Index>(), interesting_char()).prop_map(|(i, c)| Edit::Replace(i, c)),
        any::<Index>().prop_map(Edit::DeleteLine),
        any::<Index>().prop_map(Edit::DuplicateLine),
        (any::<Index>(), any::<Index>()).prop_map(|(a, b)| Edit::SwapLines(a, b)),
    ]
}

fn apply(text: &str, edits: &[Edit]) -> String {
    let mut chars: Vec<char> = text.chars().collect();
    for edit in edits {
        match edit {
            Edit::Delete(i) if !chars.is_empty() => {
                chars.remove(i.index(chars.len()));
            }
            Edit::Insert(i, c) => {
                let at = i.index(chars.len() + 1);
                chars.insert(at, *c);
            }
            Edit::Replace(i, c) if !chars.is_empty() => {
                let at = i.index(chars.len());
                chars[at] = *c;
            }
            Edit::DeleteLine(i) | Edit::DuplicateLine(i) | Edit::SwapLines(i, _) => {
                let s: String = chars.iter().collect();
                let mut lines: Vec<&str> = s.split('\n').collect();
                let a = i.index(lines.len());
                match edit {
                    Edit::DeleteLine(_) => {
                        lines.remove(a);
                    }
                    Edit::DuplicateLine(_) => lines.insert(a, lines[a]),
                    Edit::SwapLines(_, j) => {
                        let b = j.index(lines.len());
                        lines.swap(a, b);
                    }
                    _ => {}
                }
                chars = lines.join("\n").chars().collect();
            }
            _ => {}
        }
    }
    chars.into_iter().collect()
}

/// Lines that are each plausible in a config, valid or not.
const FRAGMENTS: &[&str] = &[
    "[server]",
    "[[group]]",
    "[group.config]",
    "[group.config.sub]",
    "[[group.config.list]]",
    "listen = [\"127.0.0.1:7878\"]",
    "listen = [\"[::1]:1\", \"0.0.0.0:0\"]",
    "listen = []",
    "listen = [\"127.0.0.1:1\", \"127.0.0.1:1\"]",
    "max_connections = 0",
    "max_connections = 4294967296",
    "idle_timeout = \"0s\"",
    "idle_timeout = \"18446744073709551615h\"",
    "max_frame = 12",
    "max_frame = \"64MiB\"",
    "max_frame = \"1G\"",
    "shutdown_grace = \"1500ms\"",
    "ring_size = 0",
    "ring_size = \"1GiB\"",
    "ring_size = 1073741825",
    "ring_size = \"3MiB\"",
    "backlog = -1",
    "read_budget = \"4KiB\"",
    "read_budget = 18446744073709551615",
    "name = \"echo\"",
    "name = \"other\"",
    "name = \"\"",
    "plugin = \"echo\"",
    "plugin = \"./x.so\"",
    "workers = 0",
    "workers = 256",
    "max_inflight = 65536",
    "max_queue = 1000000",
    "commands = []",
    "commands = [1, 2]",
    "commands = [2]",
    "commands = [65536]",
    "config = {}",
    "greeting = \"hi\"",
    "nested = { a = [1, 2.5, nan, inf] }",
    "when = 1979-05-27",
    "x = 1",
];

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_strings_never_panic(text in any::<String>()) {
        check(&text)?;
    }

    #[test]
    fn toml_like_strings_never_panic(text in "[\\[\\]a-z_=\"'0-9., {}\n#-]{0,200}") {
        check(&text)?;
    }

    #[test]
    fn mutated_example_never_panics(edits in prop::collection::vec(edit(), 1..10)) {
        check(&apply(EXAMPLE_CONFIG, &edits))?;
    }

    #[test]
    fn assembled_fragments_never_panic(
        picks in prop::collection::vec(prop::sample::select(FRAGMENTS), 0..24)
    ) {
        check(&picks.join("\n"))?;
    }
}
