//! Both kinds of backup target, exercised the same way: a directory (`file://`) and
//! a real S3 service (Garage on loopback). Then what a wrong setting gets from S3:
//! a clear error naming the cause, and nothing written.

use horn_backup::garage::Garage;
use horn_backup::s3::S3Settings;
use horn_backup::store::{open_target, ObjectStore};

/// What every target must do.
fn exercise(store: &dyn ObjectStore) {
    assert_eq!(store.get("volumes/v/backups/none.json").unwrap(), None);
    assert!(!store.exists("blocks/ab/none").unwrap());
    store.put("volumes/v/backups/b1.json", b"one").unwrap();
    store.put("volumes/v/backups/b2.json", b"two").unwrap();
    store.put("volumes/w/backups/b1.json", b"other volume").unwrap();
    store.put("volumes/v/backups/b1.json", b"one again").unwrap();
    assert_eq!(
        store.get("volumes/v/backups/b1.json").unwrap().as_deref(),
        Some(&b"one again"[..])
    );
    assert!(store.exists("volumes/v/backups/b2.json").unwrap());
    assert_eq!(
        store.list("volumes/v/backups/").unwrap(),
        vec!["volumes/v/backups/b1.json", "volumes/v/backups/b2.json"],
        "a volume's listing holds its own backups and nothing else"
    );
    store.delete("volumes/v/backups/b1.json").unwrap();
    store.delete("volumes/v/backups/b1.json").unwrap();
    assert_eq!(
        store.list("volumes/v/backups/").unwrap(),
        vec!["volumes/v/backups/b2.json"]
    );
    assert!(store.list("volumes/x/").unwrap().is_empty());
    assert_eq!(
        store.list_dirs("volumes/").unwrap(),
        ["v", "w"],
        "the volumes, one level deep"
    );
    assert!(store.list_dirs("nothing/").unwrap().is_empty());
    for bad in ["../x", "/abs", "a//b", ".hidden", "a/../b", "sp ace"] {
        assert!(store.put(bad, b"x").is_err(), "{bad:?} is refused");
        assert!(store.get(bad).is_err(), "{bad:?} is refused");
    }
}

#[test]
fn a_directory_target_keeps_objects_by_key() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().display());
    let store = open_target(&url, &S3Settings::default()).unwrap();
    exercise(store.as_ref());
    let missing = format!("file://{}/not-mounted", dir.path().display());
    let e = open_target(&missing, &S3Settings::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("mount the share"), "{e}");
}

#[test]
fn an_s3_target_keeps_objects_by_key_and_lists_past_a_page() {
    let dir = tempfile::tempdir().unwrap();
    let garage = Garage::start(dir.path(), "horn-backups").unwrap();
    let store = open_target(&garage.url("cluster-a"), &garage.settings()).unwrap();
    exercise(store.as_ref());
    // Another prefix of the same bucket is another target.
    let other = open_target(&garage.url("cluster-b"), &garage.settings()).unwrap();
    assert!(other.list("volumes/v/backups/").unwrap().is_empty());
    // More keys than one listing page (1,000) holds.
    std::thread::scope(|s| {
        for t in 0..4 {
            let other = &other;
            s.spawn(move || {
                for i in (t..1010).step_by(4) {
                    other.put(&format!("blocks/00/{i:05}"), b"x").unwrap();
                }
            });
        }
    });
    let keys = other.list("blocks/00/").unwrap();
    assert_eq!(keys.len(), 1010);
    assert_eq!(keys[0], "blocks/00/00000");
    assert_eq!(keys[1009], "blocks/00/01009");
}

#[test]
fn wrong_s3_settings_are_named_and_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let garage = Garage::start(dir.path(), "horn-backups").unwrap();
    let good = garage.settings();
    let err = |url: &str, s: &S3Settings| {
        let e = open_target(url, s).unwrap_err().to_string();
        eprintln!("{url}: {e}");
        e
    };

    let wrong_secret = S3Settings {
        secret_key: "0".repeat(64),
        ..good.clone()
    };
    let e = err(&garage.url(""), &wrong_secret);
    assert!(
        e.contains("the secret key is wrong") || e.contains("access denied"),
        "{e}"
    );

    let unknown_key = S3Settings {
        access_key: "GK000000000000000000000000".into(),
        ..good.clone()
    };
    let e = err(&garage.url(""), &unknown_key);
    assert!(
        e.contains("does not know this access key") || e.contains("access denied"),
        "{e}"
    );

    let e = err("s3://no-such-bucket/x", &good);
    assert!(e.contains("no bucket \"no-such-bucket\""), "{e}");

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let nowhere = S3Settings {
        endpoint: format!("http://127.0.0.1:{port}"),
        ..good.clone()
    };
    let e = err(&garage.url(""), &nowhere);
    assert!(e.contains("does not answer"), "{e}");

    let none = S3Settings {
        access_key: String::new(),
        secret_key: String::new(),
        ..good.clone()
    };
    // The environment could fill them in; this test wants them missing.
    if std::env::var_os("AWS_ACCESS_KEY_ID").is_none() {
        let e = err(&garage.url(""), &none);
        assert!(e.contains("no S3 credentials"), "{e}");
    }

    assert!(err("s3://UPPER/x", &good).contains("not an S3 bucket name"));
    assert!(err("ftp://x", &good).contains("not a backup target"));

    // Nothing was written by any of them.
    let store = open_target(&garage.url(""), &good).unwrap();
    assert!(store.list("volumes/").unwrap().is_empty());
    assert!(store.list("blocks/").unwrap().is_empty());
}
