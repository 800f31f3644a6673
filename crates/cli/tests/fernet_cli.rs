//! Every vector in ../shared/vectors through `strongroom fernet decrypt`, plus round trips.

mod common;

use common::{read_json, stdout_of, strongroom, unix, vectors_dir};
use serde_json::Value;

struct Run {
    code: i32,
    stdout: Vec<u8>,
    stderr: String,
}

/// Runs `fernet decrypt`, the token on stdin when `via_stdin`, else as the argument.
fn decrypt(keys: &[&str], hkdf: bool, extra: &[String], token: &str, via_stdin: bool) -> Run {
    let mut cmd = strongroom();
    cmd.args(["fernet", "decrypt"]);
    for k in keys {
        cmd.arg(format!("--key={k}"));
    }
    if hkdf {
        cmd.arg("--django-hkdf");
    }
    cmd.args(extra);
    if via_stdin {
        cmd.write_stdin(format!("{token}\n"));
    } else {
        cmd.arg("--").arg(token);
    }
    let out = cmd.output().unwrap();
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: out.stdout,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn assert_ok(run: &Run, want: &[u8], what: &str) {
    assert_eq!(run.code, 0, "{what}: stderr {}", run.stderr);
    assert_eq!(run.stdout, want, "{what}: wrong plaintext");
    assert!(
        run.stderr.is_empty(),
        "{what}: unexpected stderr {}",
        run.stderr
    );
}

fn assert_rejected(run: &Run, what: &str) {
    assert_ne!(run.code, 0, "{what}: must be rejected");
    assert!(
        run.stdout.is_empty(),
        "{what}: printed to stdout on failure"
    );
    assert_eq!(
        run.stderr.trim_end().lines().count(),
        1,
        "{what}: want one line, got {:?}",
        run.stderr
    );
}

fn spec_files(name: &str) -> Vec<Value> {
    let dir = vectors_dir().join("fernet-spec");
    [dir.join(name), dir.join("generated").join(name)]
        .iter()
        .flat_map(|p| read_json(p).as_array().unwrap().clone())
        .collect()
}

#[test]
fn spec_generate_and_verify_tokens_decrypt() {
    let mut n = 0;
    for (i, v) in spec_files("generate.json").iter().enumerate() {
        let run = decrypt(
            &[v["secret"].as_str().unwrap()],
            false,
            &[],
            v["token"].as_str().unwrap(),
            i % 2 == 0,
        );
        assert_ok(&run, v["src"].as_str().unwrap().as_bytes(), "generate");
        n += 1;
    }
    for (i, v) in spec_files("verify.json").iter().enumerate() {
        let extra = vec![
            format!("--ttl={}", v["ttl_sec"].as_u64().unwrap()),
            format!("--at={}", unix(v["now"].as_str().unwrap())),
        ];
        let run = decrypt(
            &[v["secret"].as_str().unwrap()],
            false,
            &extra,
            v["token"].as_str().unwrap(),
            i % 2 == 1,
        );
        assert_ok(
            &run,
            v["src"].as_str().unwrap().as_bytes(),
            v["desc"].as_str().unwrap_or("verify"),
        );
        n += 1;
    }
    assert!(n >= 28, "only {n} vectors");
}

#[test]
fn spec_invalid_tokens_are_rejected() {
    let all = spec_files("invalid.json");
    assert!(all.len() >= 24);
    for (i, v) in all.iter().enumerate() {
        let extra = vec![
            format!("--ttl={}", v["ttl_sec"].as_u64().unwrap()),
            format!("--at={}", unix(v["now"].as_str().unwrap())),
        ];
        let token = v["token"].as_str().unwrap();
        let desc = v["desc"].as_str().unwrap();
        // An empty token on the command line is still a token to reject; through stdin too.
        let run = decrypt(
            &[v["secret"].as_str().unwrap()],
            false,
            &extra,
            token,
            i % 2 == 0,
        );
        assert_rejected(&run, desc);
    }
}

#[test]
fn the_canonical_spelling_decrypts_and_lenient_ones_are_refused() {
    let quirks = read_json(&vectors_dir().join("fernet-spec/decoding_quirks.json"));
    for q in quirks.as_array().unwrap() {
        let desc = q["desc"].as_str().unwrap();
        let token = q["token"].as_str().unwrap();
        let key = q["secret"].as_str().unwrap();
        let run = decrypt(&[key], false, &[], token, false);
        match desc {
            // Surrounding whitespace is trimmed by the CLI (not the library), so these two
            // are the canonical token once trimmed.
            "canonical token" | "trailing newline" | "leading and trailing spaces" => {
                assert_ok(&run, q["src"].as_str().unwrap().as_bytes(), desc)
            }
            // Strict decoding: no other spelling is accepted (see the library docs).
            _ => assert_rejected(&run, desc),
        }
    }
}

fn django_setups() -> Vec<Value> {
    let root = vectors_dir().join("django-fernet-fields");
    let mut out = Vec::new();
    for combo in ["dff-0.6_django-3.2", "dff-v2-0.9_django-6.1"] {
        for setup in [
            "a_single_key_hkdf",
            "b_hkdf_off",
            "c_secret_key_fallback",
            "d_rotation",
        ] {
            out.push(read_json(&root.join(combo).join(format!("{setup}.json"))));
        }
    }
    out
}

/// The CLI arguments that stand for a Django settings block: FERNET_KEYS (or
/// `[SECRET_KEY]`) in order, and `--django-hkdf` unless FERNET_USE_HKDF is False.
fn keys_of(settings: &Value) -> (Vec<String>, bool) {
    let keys = match settings["FERNET_KEYS"].as_array() {
        Some(list) => list
            .iter()
            .map(|k| k.as_str().unwrap().to_owned())
            .collect(),
        None => vec![settings["SECRET_KEY"].as_str().unwrap().to_owned()],
    };
    let hkdf = settings["FERNET_USE_HKDF"].as_bool().unwrap_or(true);
    (keys, hkdf)
}

#[test]
fn every_django_fernet_fields_token_decrypts_to_its_plaintext() {
    let mut tokens = 0;
    for setup in django_setups() {
        let name = setup["setup"].as_str().unwrap().to_owned();
        let (keys, hkdf) = keys_of(&setup["settings"]);
        let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
        for (i, v) in setup["vectors"].as_array().unwrap().iter().enumerate() {
            let Some(token) = v["token"].as_str() else {
                assert!(
                    v["plaintext_utf8"].is_null(),
                    "{name}: NULL column with a plaintext"
                );
                continue;
            };
            let what = format!("{name} row {} {}", v["row_id"], v["column"]);
            let run = decrypt(&keys, hkdf, &[], token, i % 2 == 0);
            assert_ok(
                &run,
                v["plaintext_utf8"].as_str().unwrap().as_bytes(),
                &what,
            );
            tokens += 1;
        }
    }
    assert!(tokens >= 300, "only {tokens} tokens checked");
}

#[test]
fn rotation_read_checks_match_django() {
    let mut checks = 0;
    for setup in django_setups()
        .into_iter()
        .filter(|s| s["setup"] == "d_rotation")
    {
        let vectors = setup["vectors"].as_array().unwrap();
        for check in setup["read_checks"].as_array().unwrap() {
            let (keys, hkdf) = keys_of(&check["settings"]);
            let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
            for result in check["results"].as_array().unwrap() {
                for v in vectors.iter().filter(|v| v["row_id"] == result["row_id"]) {
                    let Some(token) = v["token"].as_str() else {
                        continue;
                    };
                    let run = decrypt(&keys, hkdf, &[], token, true);
                    let what = format!("{} row {} {}", check["name"], v["row_id"], v["column"]);
                    if result["readable"].as_bool().unwrap() {
                        assert_ok(
                            &run,
                            v["plaintext_utf8"].as_str().unwrap().as_bytes(),
                            &what,
                        );
                    } else {
                        assert_rejected(&run, &what);
                    }
                    checks += 1;
                }
            }
        }
    }
    assert!(checks >= 100, "only {checks} read checks");
}

#[test]
fn encrypt_then_decrypt_round_trips_exact_bytes() {
    let key = String::from_utf8(
        strongroom()
            .args(["fernet", "generate-key"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let key = key.trim();
    let old = "an old django passphrase";
    let plaintext: Vec<u8> = (0..=255u8)
        .chain(b"\r\n\0 trailing  \n".iter().copied())
        .collect();
    let out = strongroom()
        .args([
            "fernet",
            "encrypt",
            "--django-hkdf",
            &format!("--key={key}"),
            &format!("--key={old}"),
        ])
        .write_stdin(plaintext.clone())
        .output()
        .unwrap();
    assert!(out.status.success());
    let token = String::from_utf8(out.stdout).unwrap();
    // Encrypted with the first key: the second alone does not open it; both in any order do.
    assert_rejected(
        &decrypt(&[old], true, &[], token.trim(), true),
        "second key only",
    );
    assert_ok(
        &decrypt(&[old, key], true, &[], token.trim(), true),
        &plaintext,
        "both keys",
    );
    assert_rejected(
        &decrypt(&[key], false, &[], token.trim(), true),
        "without hkdf",
    );
}

/// One urlsafe-base64 Fernet key in 64 starts with `-`: `--key KEY` (a separate word, as
/// the README writes it) must take it as the key, not as an unknown flag.
#[test]
fn a_key_that_starts_with_a_hyphen_is_a_key() {
    use base64::Engine;
    let key = base64::engine::general_purpose::URL_SAFE.encode([0xf8u8; 32]);
    assert!(key.starts_with('-'), "{key}");
    let token = stdout_of(
        strongroom()
            .args(["fernet", "encrypt", "--key", &key])
            .write_stdin("hyphen-key plaintext"),
    );
    let token = String::from_utf8(token).unwrap();
    let plain = stdout_of(strongroom().args(["fernet", "decrypt", "--key", &key, token.trim()]));
    assert_eq!(plain, b"hyphen-key plaintext");
}

#[test]
fn errors_name_no_secret() {
    let key = "cw_0x689RpI-jtRR7oE8h_eQsKImvJapLeSbXpwF4e4=";
    let wrong = "jQ3QxzItu50LO1dsMkER8EpQPzaxs-D5C8lY0fhEn_4=";
    let token = "gAAAAAAdwJ6wAAECAwQFBgcICQoLDA0ODy021cpGVWKZ_eEwCGM4BLLF_5CV9dOPmrhuVUPgJobwOz7JcbmrR64jVmpU4IwqDA==";
    let run = decrypt(&[wrong], false, &[], token, false);
    assert_rejected(&run, "wrong key");
    for secret in [key, wrong, token, "hello"] {
        assert!(!run.stderr.contains(secret), "stderr leaks: {}", run.stderr);
    }
    let bad_key = strongroom()
        .args(["fernet", "decrypt", "--key=not-a-key", token])
        .output()
        .unwrap();
    assert!(!bad_key.status.success());
    assert!(!String::from_utf8_lossy(&bad_key.stderr).contains("not-a-key"));
    let no_key = strongroom()
        .args(["fernet", "decrypt", token])
        .output()
        .unwrap();
    assert_eq!(no_key.status.code(), Some(2));
}

#[test]
fn a_key_file_others_may_read_is_warned_about() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let key = stdout_of(strongroom().args(["fernet", "generate-key"]));
    let file = tmp.path().join("keys");
    std::fs::write(&file, &key).unwrap();
    for (mode, warned) in [(0o640, true), (0o600, false)] {
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode)).unwrap();
        let out = strongroom()
            .args(["fernet", "encrypt", "--key-file"])
            .arg(&file)
            .write_stdin("x")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(0));
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            err.contains("--key-file") && err.contains("readable by group or others"),
            warned,
            "mode {mode:o}: {err}"
        );
    }
}

/// A reader that has gone away (`| head -c 0`) ends every command quietly with 141, as it
/// would a Unix tool, not with a panic or an error.
#[test]
fn a_closed_stdout_ends_quietly() {
    let key = String::from_utf8(stdout_of(strongroom().args(["fernet", "generate-key"]))).unwrap();
    let key = key.trim();
    let token = String::from_utf8(stdout_of(
        strongroom()
            .args(["fernet", "encrypt", "--key", key])
            .write_stdin("v"),
    ))
    .unwrap();
    for (args, stdin) in [
        (vec!["fernet", "encrypt", "--key", key], "the value"),
        (vec!["fernet", "decrypt", "--key", key], token.as_str()),
        (vec!["fernet", "generate-key"], ""),
    ] {
        let out =
            common::with_stdout_closed(common::strongroom_process().args(&args), stdin.as_bytes());
        common::assert_ends_quietly(&out, &args[..2].join(" "));
    }
}

/// `fernet decrypt` of a token from an application's database (its plaintext is whatever a
/// user stored) writes the exact bytes to a pipe, and to a terminal only text without
/// control characters, as `credential reveal` does: an escape sequence in it would act on
/// the operator's terminal.
#[test]
fn decrypt_keeps_control_characters_off_a_terminal() {
    let key = String::from_utf8(stdout_of(strongroom().args(["fernet", "generate-key"])))
        .unwrap()
        .trim()
        .to_owned();
    let token = |plaintext: &[u8]| {
        String::from_utf8(stdout_of(
            strongroom()
                .args(["fernet", "encrypt", "--key", &key])
                .write_stdin(plaintext.to_vec()),
        ))
        .unwrap()
        .trim()
        .to_owned()
    };
    let tricky = token(b"x\x1b]0;pwned\x07y");
    let piped = decrypt(&[&key], false, &[], &tricky, false);
    assert_ok(&piped, b"x\x1b]0;pwned\x07y", "to a pipe");
    let bin = assert_cmd::cargo::cargo_bin("strongroom");
    let on_a_terminal = |token: &str| {
        let line = format!(
            "'{}' fernet decrypt --key '{key}' -- '{token}'",
            bin.display()
        );
        let out = std::process::Command::new("script")
            .args(["-qec", &line, "/dev/null"])
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (code, screen) = on_a_terminal(&tricky);
    assert_eq!(code, Some(1), "{screen:?}");
    assert!(screen.contains("control characters"), "{screen:?}");
    assert!(
        !screen.contains("pwned") && !screen.contains('\x1b'),
        "part of the plaintext reached the terminal: {screen:?}"
    );
    let (code, screen) = on_a_terminal(&token(b"plain-secret"));
    assert_eq!(code, Some(0), "{screen:?}");
    assert_eq!(screen, "plain-secret\r\n");
}
