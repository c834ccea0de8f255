//! Naming rules for topics and consumer groups.

/// Longest topic or consumer-group name, in bytes.
pub const NAME_BYTES_MAX: usize = 128;

/// Why a name was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// The empty string.
    #[error("a name may not be empty")]
    Empty,
    /// Over [`NAME_BYTES_MAX`].
    #[error("name is {0} bytes; the limit is {NAME_BYTES_MAX}")]
    TooLong(usize),
    /// A character outside `[A-Za-z0-9._-]`.
    #[error("name {name:?} has {character:?}; allowed are letters, digits, '.', '_' and '-'")]
    BadCharacter {
        /// The refused name.
        name: String,
        /// The first character not allowed.
        character: char,
    },
}

/// Checks a topic or consumer-group name: 1 to 128 of `[A-Za-z0-9._-]`.
pub fn validate_name(name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name.len() > NAME_BYTES_MAX {
        return Err(NameError::TooLong(name.len()));
    }
    match name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        Some(character) => Err(NameError::BadCharacter {
            name: name.to_string(),
            character,
        }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_rules() {
        assert_eq!(validate_name("orders.v2_eu-1"), Ok(()));
        assert_eq!(validate_name(""), Err(NameError::Empty));
        assert_eq!(
            validate_name(&"a".repeat(129)),
            Err(NameError::TooLong(129))
        );
        assert!(matches!(
            validate_name("a b"),
            Err(NameError::BadCharacter { character: ' ', .. })
        ));
    }
}
