//! detectbackup: the proxy answers which site a request arriving now is served by.

use http::{header, HeaderValue, Method, Response, StatusCode};

use crate::body::ProxyBody;
use crate::route::Site;

/// Is this one of the detectbackup paths (`/detectbackup.php`, `/<x>/detectbackup.php`,
/// `/detectbackup`)?
pub fn is_detect_path(path: &str) -> bool {
    // One comparison for almost every request: the last segment must be the file name.
    if !path.ends_with("detectbackup.php") && !path.ends_with("detectbackup") {
        return false;
    }
    if path == "/detectbackup" || path == "/detectbackup.php" {
        return true;
    }
    // `/<x>/detectbackup.php`: exactly one non-empty segment before the file name.
    path.strip_suffix("/detectbackup.php")
        .and_then(|p| p.strip_prefix('/'))
        .is_some_and(|segment| !segment.is_empty() && !segment.contains('/'))
}

/// The answer: 200, `text/plain`, body exactly `Primary` or `Backup`, never cached. HEAD gets
/// the same headers without a body; other methods get 405.
pub fn answer(method: &Method, active: Site) -> Response<ProxyBody> {
    let (status, body) = match *method {
        Method::GET => (StatusCode::OK, ProxyBody::full(active.title())),
        Method::HEAD => (StatusCode::OK, ProxyBody::empty()),
        _ => (
            StatusCode::METHOD_NOT_ALLOWED,
            ProxyBody::full("detectbackup answers GET only\n"),
        ),
    };
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if status == StatusCode::OK {
        h.insert(
            header::CONTENT_LENGTH,
            HeaderValue::from(active.title().len()),
        );
    } else {
        h.insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[test]
    fn paths() {
        for p in [
            "/detectbackup.php",
            "/detectbackup",
            "/primary/detectbackup.php",
            "/zoom/detectbackup.php",
        ] {
            assert!(is_detect_path(p), "{p}");
        }
        for p in [
            "/",
            "/a/b/detectbackup.php",
            "//detectbackup.php",
            "/xdetectbackup.php",
            "/detectbackup/x",
            "/a/detectbackup",
        ] {
            assert!(!is_detect_path(p), "{p}");
        }
    }

    #[tokio::test]
    async fn answer_is_exact() {
        let resp = answer(&Method::GET, Site::Backup);
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()[header::CACHE_CONTROL], "no-store");
        assert_eq!(resp.headers()[header::CONTENT_TYPE], "text/plain");
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        assert_eq!(&body[..], b"Backup");
        assert_eq!(answer(&Method::POST, Site::Primary).status(), 405);
    }
}
