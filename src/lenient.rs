//! Go-compatible lenient access to JSON objects.
//!
//! The official server decodes JSON into Go structs, which match keys case-insensitively
//! (an exact match preferred), let the last duplicate win and ignore unknown keys. Senders
//! and clients were written against that, so both `/events` bodies and client messages are
//! read through [`Object`], which keeps every value as raw, already-validated JSON text.

use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;
use std::borrow::Cow;
use std::fmt;

/// A field holds a value of another JSON type than the one asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WrongType;

/// A JSON object as its entries in document order, values unparsed.
#[derive(Debug, Default)]
pub struct Object<'a>(Vec<(Cow<'a, str>, &'a RawValue)>);

impl<'a> Object<'a> {
    /// Parses `text` as exactly one JSON object (trailing data is an error, as in Go).
    pub fn parse(text: &'a str) -> Result<Object<'a>, serde_json::Error> {
        serde_json::from_str(text)
    }

    /// The value for `name`, matched as Go's decoder does.
    pub fn get(&self, name: &str) -> Option<&'a RawValue> {
        let exact = self.0.iter().rev().find(|(k, _)| k == name);
        exact
            .or_else(|| self.0.iter().rev().find(|(k, _)| k.eq_ignore_ascii_case(name)))
            .map(|(_, v)| *v)
    }

    /// A string field: `Ok(None)` when absent or null, `Err` when of another type.
    pub fn string(&self, name: &str) -> Result<Option<String>, WrongType> {
        match self.get(name) {
            None => Ok(None),
            Some(raw) => serde_json::from_str::<Option<String>>(raw.get()).map_err(|_| WrongType),
        }
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Object<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = Object<'a>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Object<'a>, M::Error> {
                let mut entries = Vec::new();
                while let Some((k, v)) = map.next_entry::<Cow<'de, str>, &'de RawValue>()? {
                    entries.push((k, v));
                }
                Ok(Object(entries))
            }
        }
        d.deserialize_map(V(std::marker::PhantomData))
    }
}

/// Removes the whitespace between JSON tokens, leaving strings, numbers and key order
/// exactly as sent. `raw` must be valid JSON (it comes from a [`RawValue`]).
pub fn compact(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    let mut in_string = false;
    let mut escaped = false;
    for c in raw.chars() {
        if in_string {
            out.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
        } else if !matches!(c, ' ' | '\t' | '\n' | '\r') {
            in_string = c == '"';
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_style_matching() {
        let o = Object::parse(r#"{"Type":"a","type":"b","REPOS":1,"x":2,"x":3}"#).unwrap();
        assert_eq!(o.get("type").unwrap().get(), "\"b\"");
        assert_eq!(o.get("repos").unwrap().get(), "1");
        assert_eq!(o.get("x").unwrap().get(), "3");
        assert!(o.get("missing").is_none());
    }

    #[test]
    fn strings() {
        let o = Object::parse(r#"{"a":"x\"y","b":null,"c":5}"#).unwrap();
        assert_eq!(o.string("a"), Ok(Some("x\"y".into())));
        assert_eq!(o.string("b"), Ok(None));
        assert_eq!(o.string("z"), Ok(None));
        assert_eq!(o.string("c"), Err(WrongType));
    }

    #[test]
    fn only_one_object() {
        for bad in ["", "[]", "1", "{} x", "{\"a\":}", "{\"a\":1", "null"] {
            assert!(Object::parse(bad).is_err(), "{bad}");
        }
        assert!(Object::parse(" {} \n").is_ok());
    }

    #[test]
    fn compact_keeps_strings_and_order() {
        assert_eq!(
            compact("{ \"b\" : 1 ,\n \"a\": \"x y\\\" z\" , \"c\": [1, 2] }"),
            "{\"b\":1,\"a\":\"x y\\\" z\",\"c\":[1,2]}"
        );
        assert_eq!(compact("\"\\\\\" "), "\"\\\\\"");
    }
}
