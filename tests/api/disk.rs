//! A full disk, then space freed: the server answers 507 while full and works again at the next
//! request, without a restart. Needs to mount a small tmpfs (root, as in CI); elsewhere it says it
//! skipped.

use std::io::Write;
use std::process::Command;

use crate::helpers::*;

/// A tmpfs of `mib` MiB mounted on a temp dir, unmounted on drop; `None` without the privilege.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(mib: u32) -> Option<SmallDisk> {
        let dir = tempfile::tempdir().ok()?;
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(dir.path())
            .output()
            .is_ok_and(|o| o.status.success());
        ok.then_some(SmallDisk { dir })
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).output();
    }
}

/// Writes zeros to `path` until the disk is full.
fn fill(path: &std::path::Path) {
    let mut f = std::fs::File::create(path).unwrap();
    let block = vec![0u8; 64 << 10];
    while f.write_all(&block).is_ok() {}
    let one = [0u8; 1];
    while f.write_all(&one).is_ok() {}
}

#[tokio::test]
async fn a_full_disk_answers_507_and_heals_at_the_next_request_once_space_is_free() {
    let Some(disk) = SmallDisk::mount(32) else {
        eprintln!("skipped: cannot mount a tmpfs here (needs root); the full-disk path is untested on this machine");
        return;
    };
    let data = disk.dir.path().join("data");
    let app = spawn_app_with(0, |s| s.storage.data_dir = data.clone()).await;
    let model = app.upload_ok(small_model()).await;
    let filler = disk.dir.path().join("filler");
    fill(&filler);

    let mut statuses = Vec::new();
    for _ in 0..6 {
        statuses.push(app.create_job(&int8_spec(&model)).await.status().as_u16());
        statuses.push(app.upload(small_model()).await.status().as_u16());
    }
    assert!(statuses.iter().all(|s| *s == 507 || *s == 202 || *s == 201), "never a 500 while full: {statuses:?}");
    assert!(statuses.contains(&507), "the disk was full: {statuses:?}");
    let ready = app.get("/readyz").await;
    assert_eq!(ready.status(), 503, "not ready while the disk is full");
    assert_eq!(staging_entries(&data), 0, "no probe or partial upload left behind");

    std::fs::remove_file(&filler).unwrap();
    // The very next requests succeed: no connection stays broken.
    for _ in 0..10 {
        assert_eq!(app.create_job(&int8_spec(&model)).await.status(), 202);
    }
    assert_eq!(app.upload(small_model()).await.status(), 201);
    assert_eq!(app.get("/readyz").await.status(), 200);
    drop(app.stop().await);
}
