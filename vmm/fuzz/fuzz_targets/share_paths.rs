//! Guest paths against the file service on a scratch share: any two
//! paths, any call, any flags. The share's parent holds a file and a
//! directory the guest must never reach; after every input they must be
//! as they were and nothing may have appeared beside the share.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use rtvm_vmm::config::ShareConfig;
use rtvm_vmm::rpc::fs::{guest_path, FileService};

struct Scratch {
    base: PathBuf,
    files: FileService,
}

fn scratch() -> &'static Scratch {
    static SCRATCH: OnceLock<Scratch> = OnceLock::new();
    SCRATCH.get_or_init(|| {
        let base = std::env::temp_dir().join(format!("rtvm-fuzz-paths-{}", std::process::id()));
        let share = base.join("share");
        std::fs::create_dir_all(share.join("dir/sub")).unwrap();
        std::fs::write(share.join("dir/file"), b"inside").unwrap();
        std::os::unix::fs::symlink("../../outside", share.join("dir/out")).unwrap();
        std::os::unix::fs::symlink("/", share.join("root")).unwrap();
        std::fs::create_dir_all(base.join("outside")).unwrap();
        std::fs::write(base.join("outside/secret"), b"secret").unwrap();
        let mut config = ShareConfig::new(share, false);
        config.max_bytes_written = 1 << 20;
        config.max_open_files = 8;
        config.max_dir_entries = 64;
        Scratch {
            base,
            files: FileService::new(config).unwrap(),
        }
    })
}

fn outside_is_untouched(base: &std::path::Path) {
    let mut beside: Vec<_> = std::fs::read_dir(base)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    beside.sort();
    assert_eq!(beside, ["outside", "share"], "something appeared beside the share");
    let outside: Vec<_> = std::fs::read_dir(base.join("outside"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(outside, ["secret"]);
    assert_eq!(std::fs::read(base.join("outside/secret")).unwrap(), b"secret");
}

fuzz_target!(|data: &[u8]| {
    let Some((&op, rest)) = data.split_first() else {
        return;
    };
    let Some((&flags, rest)) = rest.split_first() else {
        return;
    };
    let cut = rest.iter().position(|&b| b == b'|').unwrap_or(rest.len());
    let (one, two) = (&rest[..cut], rest.get(cut + 1..).unwrap_or_default());
    let s = scratch();
    let (Ok(one), Ok(two)) = (guest_path(one), guest_path(two)) else {
        return;
    };
    let files = &s.files;
    match op % 7 {
        0 => {
            if let Ok([h, ..]) = files.open(&one, u64::from(flags), 0o644) {
                let _ = files.write(h, b"x", 0);
                let _ = files.close(h);
            }
        }
        1 => {
            let _ = files.stat(&one);
        }
        2 => {
            let _ = files.mkdir(&one, u64::from(flags) & 0o777);
        }
        3 => {
            let _ = files.unlink(&one, u64::from(flags & 1));
        }
        4 => {
            let _ = files.rename(&one, &two);
        }
        5 => {
            let _ = files.readdir(&one, u64::from(flags), 512);
        }
        _ => {
            let _ = files.readdir(&one, 0, u64::from(flags));
        }
    }
    outside_is_untouched(&s.base);
});
