//! Assignment is the reference algorithm, bit for bit: checked live against
//! CPython's hashlib (library and `abgate assign` CLI), plus the properties
//! a rollout depends on.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::Write;
use std::process::{Command, Stdio};

use abgate::experiment::assign::{assign, bucket, is_treatment, Variant};
use proptest::prelude::*;

const FRACTIONS: [f64; 11] = [
    0.0,
    0.001,
    0.05,
    0.1,
    0.25,
    1.0 / 3.0,
    0.5,
    0.1 + 0.2, // 0.30000000000000004: a fraction that is not what it looks like
    0.999,
    0.9995,
    1.0,
];

/// The Python reference, verbatim from the spec, run over JSON input.
const PYTHON_REFERENCE: &str = r#"
import hashlib, json, sys
data = json.load(sys.stdin)
out = []
for uid in data["ids"]:
    for salt in (None, "exp-42"):
        key = uid if salt is None else salt + ":" + uid
        bucket = int(hashlib.md5(key.encode("utf-8")).hexdigest(), 16) % 1000
        out.append([bucket, [bucket / 1000.0 < f for f in data["fractions"]]])
json.dump(out, sys.stdout)
"#;

fn python(script: &str, input: &[u8]) -> Vec<u8> {
    let mut child = Command::new("python3")
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 must be installed: the reference implementation runs in it");
    let mut stdin = child.stdin.take().unwrap();
    let input = input.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let output = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    assert!(output.status.success(), "python reference failed");
    output.stdout
}

/// IDs that have tripped up reimplementations: empty, ASCII, every UTF-8
/// width, combining marks, NUL, whitespace, 10 kB, plus seeded random ones.
fn generated_ids() -> Vec<String> {
    let mut ids: Vec<String> = vec![
        String::new(),
        " ".into(),
        "user-1".into(),
        "User-1".into(),
        "user-1 ".into(),
        "ユーザー".into(),
        "Ünïcødé".into(),
        "e\u{301}".into(),
        "\u{e9}".into(),
        "👩‍👩‍👧‍👦".into(),
        "\u{0}".into(),
        "tab\there".into(),
        "line\r".into(),
        "\u{10ffff}".into(),
        "x".repeat(10_000),
        "é".repeat(5_000),
        "42".into(),
        "00042".into(),
        "alice@example.com".into(),
        "550e8400-e29b-41d4-a716-446655440000".into(),
    ];
    ids.extend((0..2000).map(|i| format!("user-{i}")));
    let mut rng = fastrand_like(0x5eed);
    for _ in 0..2000 {
        let len = (rng() % 40) as usize;
        let id: String = (0..len)
            .map(|_| {
                let pick = rng();
                let code = match pick % 4 {
                    0 => 0x20 + pick % 0x5f,     // printable ASCII
                    1 => 0xa0 + pick % 0x700,    // Latin, Greek, Cyrillic
                    2 => 0x3040 + pick % 0x6000, // kana, CJK
                    _ => 0x1f300 + pick % 0x300, // emoji
                };
                char::from_u32(code as u32).unwrap_or('?')
            })
            .collect();
        ids.push(id);
    }
    ids
}

/// A seeded xorshift, so the generated IDs are the same every run.
fn fastrand_like(seed: u64) -> impl FnMut() -> u64 {
    let mut state = seed;
    move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    }
}

#[test]
fn library_matches_python_hashlib_for_every_id_fraction_and_salt() {
    let ids = generated_ids();
    let input = serde_json::json!({ "ids": ids, "fractions": FRACTIONS });
    let reference: Vec<(u32, Vec<bool>)> =
        serde_json::from_slice(&python(PYTHON_REFERENCE, input.to_string().as_bytes())).unwrap();
    assert_eq!(reference.len(), ids.len() * 2);
    let mut checked = 0;
    for (i, id) in ids.iter().enumerate() {
        for (j, salt) in [None, Some("exp-42")].into_iter().enumerate() {
            let (expected_bucket, expected_variants) = &reference[i * 2 + j];
            let got = bucket(id.as_bytes(), salt);
            assert_eq!(got, *expected_bucket, "bucket of {id:?} salt {salt:?}");
            for (fraction, expected) in FRACTIONS.iter().zip(expected_variants) {
                let variant = assign(id.as_bytes(), salt, *fraction);
                assert_eq!(
                    variant == Variant::Treatment,
                    *expected,
                    "{id:?} salt {salt:?} at fraction {fraction}"
                );
                checked += 1;
            }
        }
    }
    assert_eq!(checked, ids.len() * 2 * FRACTIONS.len());
}

#[test]
fn cli_matches_python_on_raw_stdin_lines() {
    // One ID per line, exact bytes: a trailing \r, spaces and bytes that are
    // not UTF-8 are all part of the ID.
    let mut lines: Vec<Vec<u8>> = generated_ids()
        .into_iter()
        .filter(|id| !id.contains('\n'))
        .map(String::into_bytes)
        .collect();
    lines.push(b"crlf-user\r".to_vec());
    lines.push(b"\xff\xfe not utf-8".to_vec());
    lines.push(b"  padded  ".to_vec());
    let mut input = lines.join(&b'\n');
    input.push(b'\n');

    let script = r#"
import hashlib, sys
for line in sys.stdin.buffer.read().split(b"\n")[:-1]:
    bucket = int(hashlib.md5(line).hexdigest(), 16) % 1000
    variant = "treatment" if bucket / 1000.0 < 0.3 else "control"
    sys.stdout.buffer.write(line + b"\t" + str(bucket).encode() + b"\t" + variant.encode() + b"\n")
"#;
    let expected = python(script, &input);

    let mut child = Command::new(env!("CARGO_BIN_EXE_abgate"))
        .args(["assign", "--fraction", "0.3"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let to_write = input.clone();
    let writer = std::thread::spawn(move || stdin.write_all(&to_write));
    let output = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    assert!(output.status.success());
    assert_eq!(
        output.stdout.split(|b| *b == b'\n').count(),
        lines.len() + 1
    );
    assert!(
        output.stdout == expected,
        "abgate assign differs from the Python reference"
    );
}

#[test]
fn cli_takes_ids_as_arguments_with_salt() {
    let output = Command::new(env!("CARGO_BIN_EXE_abgate"))
        .args([
            "assign",
            "--fraction",
            "1",
            "--salt",
            "exp-42",
            "user-1",
            "ユーザー",
        ])
        .output()
        .unwrap();
    assert!(output.status.success());
    let text = String::from_utf8(output.stdout).unwrap();
    let expected = format!(
        "user-1\t{}\ttreatment\nユーザー\t{}\ttreatment\n",
        bucket(b"exp-42:user-1", None),
        bucket("exp-42:ユーザー".as_bytes(), None)
    );
    assert_eq!(text, expected);

    let bad = Command::new(env!("CARGO_BIN_EXE_abgate"))
        .args(["assign", "--fraction", "1.5", "u"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("0.0 to 1.0"));
}

#[test]
fn observed_share_is_within_binomial_noise() {
    let n = 100_000;
    for fraction in [0.05, 0.10, 0.25, 0.5] {
        let treated = (0..n)
            .filter(|i| {
                assign(format!("user-{i}").as_bytes(), None, fraction) == Variant::Treatment
            })
            .count();
        let expected = n as f64 * fraction;
        let sd = (n as f64 * fraction * (1.0 - fraction)).sqrt();
        assert!(
            (treated as f64 - expected).abs() < 5.0 * sd,
            "{treated} of {n} at {fraction}: more than 5 sd from {expected}"
        );
    }
}

proptest! {
    #[test]
    fn deterministic(id in ".*", salt in proptest::option::of("[a-z0-9-]{1,12}")) {
        prop_assert_eq!(bucket(id.as_bytes(), salt.as_deref()), bucket(id.as_bytes(), salt.as_deref()));
        prop_assert!(bucket(id.as_bytes(), salt.as_deref()) < 1000);
    }

    #[test]
    fn raising_the_fraction_never_moves_a_user_to_control(
        id in ".*", low in 0.0f64..=1.0, high in 0.0f64..=1.0,
    ) {
        let (low, high) = if low <= high { (low, high) } else { (high, low) };
        if assign(id.as_bytes(), None, low) == Variant::Treatment {
            prop_assert_eq!(assign(id.as_bytes(), None, high), Variant::Treatment);
        }
    }

    #[test]
    fn zero_is_nobody_and_one_is_everybody(id in proptest::collection::vec(any::<u8>(), 0..64)) {
        prop_assert_eq!(assign(&id, None, 0.0), Variant::Control);
        prop_assert_eq!(assign(&id, None, 1.0), Variant::Treatment);
        prop_assert!(!is_treatment(bucket(&id, None), 0.0));
    }
}
