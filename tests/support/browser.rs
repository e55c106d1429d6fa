//! A real browser for the tests: Debian's headless Chromium, driven from the command
//! line (`--dump-dom` for the rendered page, `--screenshot` for the picture).
//! tests/run.sh installs it when it is missing; without it a test fails, naming the
//! package, never skips.

use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::process::Command;

/// How long one browser run may take before the test fails.
const RUN_TIMEOUT: Duration = Duration::from_secs(90);

/// The browser: `$KEELSON_TEST_CHROMIUM`, else `chromium` on the PATH.
pub fn chromium() -> PathBuf {
    if let Ok(path) = std::env::var("KEELSON_TEST_CHROMIUM") {
        return PathBuf::from(path);
    }
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("chromium"))
            .find(|p| p.is_file())
    });
    found.unwrap_or_else(|| {
        panic!(
            "no chromium on the PATH: the dashboard tests need a real browser; install \
             Debian's package (`apt-get install -y chromium`, which bash tests/run.sh \
             does) or set KEELSON_TEST_CHROMIUM"
        )
    })
}

/// Run headless Chromium on `url` with `args`, letting the page run for `budget` of
/// its own (virtual) time, and return its standard output.
async fn run(url: &str, args: &[String], budget: Duration) -> String {
    let profile = tempfile::tempdir().expect("cannot create a browser profile directory");
    let mut cmd = Command::new(chromium());
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-extensions",
        "--hide-scrollbars",
    ])
    .arg(format!("--user-data-dir={}", profile.path().display()))
    .arg(format!("--virtual-time-budget={}", budget.as_millis()))
    .args(args)
    .arg(url)
    .kill_on_drop(true);
    let out = tokio::time::timeout(RUN_TIMEOUT, cmd.output())
        .await
        .unwrap_or_else(|_| panic!("chromium did not finish within {RUN_TIMEOUT:?} on {url}"))
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", chromium().display()));
    assert!(
        out.status.success(),
        "chromium failed ({}) on {url}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The page at `url` as the browser rendered it after `budget` of page time.
pub async fn dump_dom(url: &str, budget: Duration) -> String {
    run(url, &["--dump-dom".to_owned()], budget).await
}

/// A 1280×900 screenshot of the page at `url` after `budget` of page time, saved as
/// the PNG `path`.
pub async fn screenshot(url: &str, path: &Path, budget: Duration) {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).expect("cannot create the screenshot's directory");
    }
    let _ = std::fs::remove_file(path);
    run(
        url,
        &[
            format!("--screenshot={}", path.display()),
            "--window-size=1280,900".to_owned(),
        ],
        budget,
    )
    .await;
    let png = std::fs::read(path)
        .unwrap_or_else(|e| panic!("chromium wrote no screenshot at {}: {e}", path.display()));
    assert!(
        png.starts_with(b"\x89PNG"),
        "{} is not a PNG",
        path.display()
    );
}

/// Where tests leave what a person may look at afterwards: `target/test-outputs/`.
pub fn test_outputs() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-outputs")
}
