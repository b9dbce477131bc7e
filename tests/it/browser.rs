//! A real headless Chromium driven over WebDriver (Debian's `chromium` and `chromium-driver`):
//! chromedriver on a free loopback port, one session, the calls a page test needs.

use std::time::Duration;

use http::Method;
use serde_json::{Value, json};

use crate::support::*;

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
/// The key WebDriver names an element by.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

pub struct Browser {
    driver: std::process::Child,
    base: String,
    http: HttpClient,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// Starts chromedriver and a headless Chromium session with a fresh profile.
    pub async fn start() -> Browser {
        for (path, package) in [(CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")] {
            assert!(
                std::path::Path::new(path).exists(),
                "this test drives a real browser and {path} is missing: install Debian's {package} (`apt-get install chromium chromium-driver`; .ci/run does)"
            );
        }
        let port = free_port();
        let driver = std::process::Command::new(CHROMEDRIVER)
            .args([format!("--port={port}"), "--allowed-ips=127.0.0.1".into()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let profile = tempfile::tempdir().unwrap();
        let mut browser = Browser {
            driver,
            base: format!("http://127.0.0.1:{port}"),
            http: client(),
            _profile: profile,
        };
        until_serving(
            "chromedriver to answer",
            &format!("{}/status", browser.base),
        )
        .await;
        let args = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--window-size=1280,1000",
        ]
        .iter()
        .map(|a| a.to_string())
        .chain([format!(
            "--user-data-dir={}",
            browser._profile.path().display()
        )])
        .collect::<Vec<_>>();
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": CHROMIUM, "args": args},
            "goog:loggingPrefs": {"browser": "ALL"},
        }}});
        let session = browser.call(Method::POST, "/session", caps).await;
        let id = session["sessionId"].as_str().unwrap().to_string();
        browser.base = format!("{}/session/{id}", browser.base);
        browser
    }

    async fn call(&self, method: Method, path: &str, body: Value) -> Value {
        let body = if method == Method::GET {
            String::new()
        } else {
            body.to_string()
        };
        let url = format!("{}{path}", self.base);
        let r = send(
            &self.http,
            method,
            &url,
            &[("content-type", "application/json")],
            body,
        )
        .await;
        let v = r.json();
        assert!(r.status.is_success(), "WebDriver {path}: {v}");
        v["value"].clone()
    }

    pub async fn open(&self, url: &str) {
        self.call(Method::POST, "/url", json!({ "url": url })).await;
    }

    /// Runs `script` (a function body) in the page and returns what it returns.
    pub async fn run(&self, script: &str) -> Value {
        self.call(
            Method::POST,
            "/execute/sync",
            json!({ "script": script, "args": [] }),
        )
        .await
    }

    async fn element(&self, css: &str) -> String {
        let v = self
            .call(
                Method::POST,
                "/element",
                json!({ "using": "css selector", "value": css }),
            )
            .await;
        v[ELEMENT].as_str().unwrap().to_string()
    }

    pub async fn click(&self, css: &str) {
        let id = self.element(css).await;
        self.call(Method::POST, &format!("/element/{id}/click"), json!({}))
            .await;
    }

    pub async fn type_into(&self, css: &str, text: &str) {
        let id = self.element(css).await;
        self.call(
            Method::POST,
            &format!("/element/{id}/value"),
            json!({ "text": text }),
        )
        .await;
    }

    /// Waits for a `confirm()` dialog, accepts it and returns its text.
    pub async fn accept_dialog(&self) -> String {
        let text = eventually("a dialog", Duration::from_secs(5), || async {
            let url = format!("{}/alert/text", self.base);
            let r = send(&self.http, Method::GET, &url, &[], "").await;
            r.status
                .is_success()
                .then(|| r.json()["value"].as_str().unwrap_or_default().to_string())
        })
        .await;
        self.call(Method::POST, "/alert/accept", json!({})).await;
        text
    }

    /// The browser's console and network messages since the last call.
    pub async fn console(&self) -> Vec<Value> {
        let v = self
            .call(Method::POST, "/se/log", json!({ "type": "browser" }))
            .await;
        v.as_array().cloned().unwrap_or_default()
    }

    pub async fn screenshot_png(&self) -> Vec<u8> {
        use base64::Engine;
        let v = self.call(Method::GET, "/screenshot", Value::Null).await;
        base64::engine::general_purpose::STANDARD
            .decode(v.as_str().unwrap())
            .unwrap()
    }
}

impl Drop for Browser {
    /// Ends the session (chromedriver closes the browser), then stops chromedriver. Blocking
    /// and best effort: a drop cannot await.
    fn drop(&mut self) {
        use std::io::{Read, Write};
        if let Some(rest) = self.base.strip_prefix("http://")
            && let Some((host, path)) = rest.split_once('/')
            && let Ok(mut conn) = std::net::TcpStream::connect(host)
        {
            let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
            let request = format!(
                "DELETE /{path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
            if conn.write_all(request.as_bytes()).is_ok() {
                let _ = conn.read_to_end(&mut Vec::new());
            }
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}
