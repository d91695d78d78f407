//! Who is calling: set on the request by the authentication middleware, read by the
//! role checks and by the rate limiter.

use std::collections::BTreeSet;

/// A permission a token can carry (`roles` claim or space-separated `scope`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// `users:read`: GET the user routes and profiles.
    UsersRead,
    /// `users:write`: POST users.
    UsersWrite,
    /// `admin`: dead-letter routes; implies every other role.
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::UsersRead => "users:read",
            Self::UsersWrite => "users:write",
            Self::Admin => "admin",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        match raw {
            "users:read" => Some(Self::UsersRead),
            "users:write" => Some(Self::UsersWrite),
            "admin" => Some(Self::Admin),
            _ => None,
        }
    }
}

/// An authenticated caller, stored in the request extensions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The token's `sub`.
    pub subject: String,
    pub roles: BTreeSet<Role>,
}

impl Principal {
    pub fn has(&self, role: Role) -> bool {
        self.roles.contains(&Role::Admin) || self.roles.contains(&role)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_implies_every_role_and_the_others_only_themselves() {
        let admin = Principal {
            subject: "root".into(),
            roles: BTreeSet::from([Role::Admin]),
        };
        let reader = Principal {
            subject: "r".into(),
            roles: BTreeSet::from([Role::UsersRead]),
        };
        for role in [Role::UsersRead, Role::UsersWrite, Role::Admin] {
            assert!(admin.has(role));
            assert_eq!(Role::parse(role.as_str()), Some(role));
        }
        assert!(reader.has(Role::UsersRead));
        assert!(!reader.has(Role::UsersWrite));
        assert!(!reader.has(Role::Admin));
        assert_eq!(Role::parse("root"), None);
    }
}
