//! User domain types. Parse, don't validate: a `UserName` or `Email` that exists is valid.

use std::fmt;

use email_address::{EmailAddress, Options};

/// A user's display name: trimmed, 3 to 100 characters, no control characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserName(String);

impl UserName {
    pub const MIN_CHARS: usize = 3;
    pub const MAX_CHARS: usize = 100;

    pub fn parse(raw: &str) -> Result<Self, String> {
        let name = raw.trim();
        let chars = name.chars().count();
        if chars < Self::MIN_CHARS {
            return Err(format!(
                "must be at least {} characters long",
                Self::MIN_CHARS
            ));
        }
        if chars > Self::MAX_CHARS {
            return Err(format!(
                "must be at most {} characters long",
                Self::MAX_CHARS
            ));
        }
        if name.chars().any(char::is_control) {
            return Err("must not contain control characters".into());
        }
        Ok(Self(name.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// An e-mail address: trimmed, at most 255 characters, RFC 5321/5322 syntax (so `+`
/// and the other local-part characters are accepted). Stored exactly as given;
/// [`Email::key`] is the case-insensitive identity used for uniqueness.
#[derive(Clone, PartialEq, Eq)]
pub struct Email(String);

impl Email {
    pub const MAX_CHARS: usize = 255;

    pub fn parse(raw: &str) -> Result<Self, String> {
        let email = raw.trim();
        if email.is_empty() {
            return Err("must not be empty".into());
        }
        if email.chars().count() > Self::MAX_CHARS {
            return Err(format!(
                "must be at most {} characters long",
                Self::MAX_CHARS
            ));
        }
        // "Ada <ada@example.com>" is a valid RFC 5322 mailbox but not an address.
        let options = Options::default().without_display_text();
        if email.chars().any(char::is_control)
            || EmailAddress::parse_with_options(email, options).is_err()
        {
            return Err("must be a valid e-mail address".into());
        }
        Ok(Self(email.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Lower-cased form: `A@x.io` and `a@x.io` are the same user.
    pub fn key(&self) -> String {
        self.0.to_lowercase()
    }
}

/// Only the first character of the local part and the domain reach a log line.
impl fmt::Debug for Email {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&mask_email(&self.0))
    }
}

/// `jane@example.com` -> `j***@example.com`.
pub fn mask_email(email: &str) -> String {
    match email.rsplit_once('@') {
        Some((local, domain)) => {
            let first: String = local.chars().take(1).collect();
            format!("{first}***@{domain}")
        }
        None => "***".into(),
    }
}

/// A user that passed validation and is about to be stored.
#[derive(Debug, Clone)]
pub struct NewUser {
    pub name: UserName,
    pub email: Email,
}

/// A change to a user: the fields to set, the others left alone.
#[derive(Debug, Clone, Default)]
pub struct UserPatch {
    pub name: Option<UserName>,
    pub email: Option<Email>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_trimmed_and_measured_in_characters() {
        assert_eq!(UserName::parse("  Ada  ").unwrap().as_str(), "Ada");
        assert!(UserName::parse("Al").is_err());
        assert!(
            UserName::parse("  Al   ").is_err(),
            "trimmed before measuring"
        );
        assert!(UserName::parse("").is_err());
        assert!(UserName::parse("   ").is_err());
        // 3 multi-byte characters are 3 characters, not 6 bytes.
        assert!(UserName::parse("Zoë").is_ok());
        assert!(UserName::parse("李小龍").is_ok());
        assert!(UserName::parse(&"a".repeat(100)).is_ok());
        assert!(UserName::parse(&"a".repeat(101)).is_err());
        assert!(UserName::parse(&"é".repeat(100)).is_ok());
    }

    #[test]
    fn names_with_control_characters_are_rejected() {
        assert!(UserName::parse("Ada\nLovelace").is_err());
        assert!(UserName::parse("Ada\u{0}Lovelace").is_err());
        assert!(UserName::parse("Ada\u{1b}[31m").is_err());
    }

    #[test]
    fn emails_accept_rfc5321_local_parts() {
        for ok in [
            "ada@example.com",
            "ada+newsletter@example.com",
            "o'brien@example.ie",
            "first.last@sub.example.co.uk",
            "x!#$%&*/=?^_`{|}~-@example.org",
            "  padded@example.com  ",
            "A@X.IO",
        ] {
            assert!(Email::parse(ok).is_ok(), "{ok} should be accepted");
        }
        assert_eq!(
            Email::parse("  padded@example.com ").unwrap().as_str(),
            "padded@example.com"
        );
    }

    #[test]
    fn malformed_emails_are_rejected() {
        for bad in [
            "",
            "   ",
            "plainaddress",
            "@example.com",
            "ada@",
            "ada@@example.com",
            "ada example@example.com",
            "Ada <ada@example.com>",
            "ada@exa\nmple.com",
            "ada\r\n@example.com",
        ] {
            assert!(Email::parse(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn email_length_limit_is_255() {
        let local = "a".repeat(64);
        let domain_len = 255 - local.len() - 1;
        let labels: Vec<String> = (0..)
            .map(|_| "b".repeat(62))
            .take(domain_len / 63)
            .collect();
        let mut domain = labels.join(".");
        domain.push_str(&format!(".{}", "c".repeat(domain_len - domain.len() - 1)));
        let at_limit = format!("{local}@{domain}");
        assert_eq!(at_limit.len(), 255);
        assert!(Email::parse(&at_limit).is_ok(), "255 characters is allowed");
        assert!(Email::parse(&format!("a{at_limit}")).is_err());
    }

    #[test]
    fn email_key_is_case_insensitive() {
        assert_eq!(
            Email::parse("Ada@Example.COM").unwrap().key(),
            Email::parse("ada@example.com").unwrap().key()
        );
        assert_eq!(
            Email::parse("Ada@Example.COM").unwrap().as_str(),
            "Ada@Example.COM"
        );
    }

    #[test]
    fn emails_are_masked_in_debug_output() {
        let email = Email::parse("jane.doe@example.com").unwrap();
        assert_eq!(format!("{email:?}"), "j***@example.com");
        assert_eq!(mask_email("no-at-sign"), "***");
    }
}
