//! External services for integration tests, found through environment variables that
//! `scripts/test-services.sh` exports. A missing service skips the test with a visible
//! message, except under CI (`CI` set), where it fails the run.

pub const POSTGRES: &str = "USERHUB_TEST_POSTGRES_URL";
pub const MONGO: &str = "USERHUB_TEST_MONGO_URL";
pub const REDIS: &str = "USERHUB_TEST_REDIS_URL";
pub const AMQP: &str = "USERHUB_TEST_AMQP_URL";

/// The URL in `var`, or `None` (after saying so) when the test should be skipped.
pub fn service_url(var: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(url) if !url.is_empty() => Some(url),
        _ if std::env::var_os("CI").is_some() => {
            panic!(
                "{var} is not set; under CI every service must be available (run scripts/test-services.sh)"
            )
        }
        _ => {
            eprintln!("SKIPPED: {var} is not set (run the tests through scripts/test-services.sh)");
            None
        }
    }
}

/// A name unique to this test run, for databases, key prefixes and queue names.
pub fn unique_name(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::now_v7().simple())
}

/// `base` with its path (the database) replaced by `/database`, query kept.
pub fn mongo_url_with_database(base: &str, database: &str) -> String {
    let (address, query) = match base.split_once('?') {
        Some((address, query)) => (address, Some(query)),
        None => (base, None),
    };
    let hosts_start = address.find("://").map_or(0, |i| i + 3);
    let hosts_end = address[hosts_start..]
        .find('/')
        .map_or(address.len(), |i| hosts_start + i);
    let mut url = format!("{}/{database}", &address[..hosts_end]);
    if let Some(query) = query {
        url.push('?');
        url.push_str(query);
    }
    url
}
