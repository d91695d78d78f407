//! Profile derivation: from a user's name to social handles.

use chrono::{DateTime, SubsecRound, Utc};
use serde::{Deserialize, Serialize};
use unicode_normalization::UnicodeNormalization;
use unicode_normalization::char::is_combining_mark;
use uuid::Uuid;

/// Lower-case, decompose (NFD), then keep only `[a-z0-9]`: combining marks and every
/// other character go. "João Silva" -> "joaosilva".
pub fn slug(text: &str) -> String {
    text.to_lowercase()
        .nfd()
        .filter(|c| !is_combining_mark(*c))
        .filter(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        .collect()
}

/// The handle for a user: the slug of the name; when that is empty (a name written
/// only in, say, CJK characters) the slug of the e-mail local part; when that is empty
/// too, the last 12 hex digits of the uuid — its random part, since a UUIDv7's leading
/// digits are a timestamp that users created in the same minute share.
pub fn handle_for(name: &str, email: &str, uuid: Uuid) -> String {
    let from_name = slug(name);
    if !from_name.is_empty() {
        return from_name;
    }
    let local_part = email.rsplit_once('@').map_or(email, |(local, _)| local);
    let from_email = slug(local_part);
    if !from_email.is_empty() {
        return from_email;
    }
    let hex = uuid.simple().to_string();
    format!("user{}", &hex[hex.len() - 12..])
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EnrichmentStatus {
    Completed,
    Failed,
}

impl EnrichmentStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Completed => "completed",
            Self::Failed => "failed",
        }
    }
}

/// What the enrichment module knows about one user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrichedProfile {
    pub uuid: Uuid,
    pub name: String,
    pub email: String,
    pub linkedin: Option<String>,
    pub github: Option<String>,
    pub status: EnrichmentStatus,
    /// Why enrichment failed (status `failed` only).
    pub error: Option<String>,
    /// The event this state was derived from.
    pub source_event_id: Uuid,
    /// The version of the user it was derived from.
    pub version: u64,
    pub enriched_at: Option<DateTime<Utc>>,
    pub updated_at: DateTime<Utc>,
}

/// What a conditional write to the profile store did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Write {
    Applied,
    /// Not written: the store holds a newer version of the user, or this very event's
    /// outcome already (a redelivery), or the user was erased.
    Stale,
}

impl EnrichedProfile {
    /// The completed profile for version `version` of a user.
    pub fn derive(
        uuid: Uuid,
        name: &str,
        email: &str,
        source_event_id: Uuid,
        version: u64,
    ) -> Self {
        let handle = handle_for(name, email, uuid);
        // Millisecond precision, like every timestamp the database writes.
        let now = Utc::now().trunc_subsecs(3);
        Self {
            uuid,
            name: name.to_owned(),
            email: email.to_owned(),
            linkedin: Some(format!("linkedin.com/in/{handle}")),
            github: Some(format!("github.com/{handle}")),
            status: EnrichmentStatus::Completed,
            error: None,
            source_event_id,
            version,
            enriched_at: Some(now),
            updated_at: now,
        }
    }

    /// The record of a user whose enrichment was given up on.
    pub fn failed(
        uuid: Uuid,
        name: &str,
        email: &str,
        source_event_id: Uuid,
        version: u64,
        error: &str,
    ) -> Self {
        Self {
            uuid,
            name: name.to_owned(),
            email: email.to_owned(),
            linkedin: None,
            github: None,
            status: EnrichmentStatus::Failed,
            error: Some(error.to_owned()),
            source_event_id,
            version,
            enriched_at: None,
            updated_at: Utc::now().trunc_subsecs(3),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UUID: Uuid = Uuid::from_u128(0x0193_6f0e_8a4c_7b21_9c3d_2f5e_8a1b_4c6d);

    #[test]
    fn derivation_table() {
        let cases = [
            ("João Silva", "joaosilva"),
            ("Ada Lovelace", "adalovelace"),
            ("ADA LOVELACE", "adalovelace"),
            ("Jean-Luc Picard", "jeanlucpicard"),
            ("Conan O'Brien", "conanobrien"),
            ("Zoë Saldaña", "zoesaldana"),
            ("François Müller", "francoismuller"),
            ("Ångström Łukasz", "angstromukasz"),
            ("Björk 🎵 Guðmundsdóttir", "bjorkgumundsdottir"),
            ("  Agent   007  ", "agent007"),
            ("R2-D2 & C-3PO", "r2d2c3po"),
            ("Ｆｕｌｌｗｉｄｔｈ", ""),
            ("Nguyễn Văn Anh", "nguyenvananh"),
        ];
        for (name, expected) in cases {
            assert_eq!(slug(name), expected, "slug of {name:?}");
        }
    }

    #[test]
    fn handle_uses_the_name_when_it_leaves_something() {
        assert_eq!(handle_for("João Silva", "x@example.com", UUID), "joaosilva");
    }

    #[test]
    fn cjk_only_name_falls_back_to_the_email_local_part() {
        assert_eq!(
            handle_for("李小龍", "Bruce.Lee+films@example.hk", UUID),
            "bruceleefilms"
        );
        assert_eq!(handle_for("🎉🎉🎉", "party@example.com", UUID), "party");
        assert_eq!(handle_for("   ", "blank@example.com", UUID), "blank");
    }

    #[test]
    fn nothing_usable_falls_back_to_the_uuid_random_part() {
        assert_eq!(
            handle_for("李小龍", "李@例子.中国", UUID),
            "user2f5e8a1b4c6d"
        );
    }

    #[test]
    fn derived_profile_has_both_links() {
        let event_id = Uuid::now_v7();
        let p = EnrichedProfile::derive(UUID, "João Silva", "joao@example.com", event_id, 2);
        assert_eq!(p.linkedin.as_deref(), Some("linkedin.com/in/joaosilva"));
        assert_eq!(p.github.as_deref(), Some("github.com/joaosilva"));
        assert_eq!(p.status, EnrichmentStatus::Completed);
        assert_eq!(p.source_event_id, event_id);
        assert_eq!(p.version, 2);
        assert!(p.enriched_at.is_some());
    }
}
