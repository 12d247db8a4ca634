//! `hornctl ublk` and `hornd engine --frontend ublk` where they cannot work: clear
//! errors, nothing claimed. (The devices themselves are tested in tests/vm/.)

mod common;

use std::process::Command;

fn run(bin: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(bin).args(args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn without_ublk_the_commands_say_how_to_get_it() {
    if std::path::Path::new("/dev/ublk-control").exists() {
        common::skip(
            "without_ublk_the_commands_say_how_to_get_it",
            "this host has ublk (tests/vm covers it)",
        );
        return;
    }
    let hornctl = env!("CARGO_BIN_EXE_hornctl");
    for args in [
        &["ublk", "list"][..],
        &["ublk", "del", "0"],
        &["ublk", "add", "--replica", "127.0.0.1:1,127.0.0.1:2"],
        &["ublk", "recover", "0", "--replica", "127.0.0.1:1,127.0.0.1:2"],
    ] {
        let (ok, err) = run(hornctl, args);
        assert!(!ok, "hornctl {args:?} succeeded");
        assert!(err.contains("modprobe ublk_drv"), "hornctl {args:?}: {err}");
    }
    // The engine refuses before it claims any replica (none is reachable here anyway,
    // which would be a different error).
    let (ok, err) = run(
        env!("CARGO_BIN_EXE_hornd"),
        &[
            "engine",
            "--frontend",
            "ublk",
            "--replica",
            "127.0.0.1:1,127.0.0.1:2",
        ],
    );
    assert!(!ok);
    assert!(err.contains("modprobe ublk_drv"), "{err}");
}

#[test]
fn hornd_refuses_an_io_size_the_wire_cannot_carry() {
    let (ok, err) = run(
        env!("CARGO_BIN_EXE_hornd"),
        &[
            "engine",
            "--frontend",
            "ublk",
            "--max-io",
            "16M",
            "--replica",
            "127.0.0.1:1,127.0.0.1:2",
        ],
    );
    assert!(!ok);
    assert!(err.contains("8 MiB"), "{err}");
}
