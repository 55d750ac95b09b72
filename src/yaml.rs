//! Reads a YAML config or state file one top-level entry, or one item of a top-level
//! list, at a time, with exactly serde_yaml 0.9's meaning.
//!
//! serde_yaml loads every event of a document before it deserialises any of it:
//! ≈ 3 KB per consumer with a credential, most of a 387 MiB peak while a 100k-consumer
//! config file loads (the same config as JSON peaks at 145 MiB; docs/benchmarks.md).
//! Here libyaml — the parser serde_yaml uses — walks the document noting only where
//! each top-level entry and each item of a top-level block list begins and ends, and
//! serde_yaml reads each such piece of the original text as the walk finds it. Every
//! piece starts at the start of a line, so its lines keep their columns and libyaml
//! reads the same events from it as from the whole document: a key with its value
//! (`listen:\n  grpc: …`) as a mapping of one entry, a list item (`  - username: …`)
//! as a list of one item. Scalars, tags and block scalars therefore resolve as they
//! always did.
//!
//! What a piece cannot see on its own sends the whole text to serde_yaml, as before:
//! an alias (its anchor may be in another piece), a `%YAML` or `%TAG` directive, a
//! top-level mapping that is tagged, in flow style or not at column 0, more than one
//! document, nesting deeper than [`MAX_DEPTH`] (serde_yaml's recursion limit counts
//! from the document's root), text libyaml refuses — and any error at all, so that
//! serde_yaml reports it with its own path and line, word for word as before.

mod events;

use std::fmt;
use std::ops::Range;
use std::sync::mpsc::{self, Receiver};

use serde::de::{self, DeserializeSeed, IgnoredAny, Visitor};
use serde::{Deserialize, Deserializer};

use events::{Event, Events, Kind};

/// Deserialises `text` piece by piece; `None` when it must be read whole by
/// serde_yaml instead (see the module doc), including when it is not a valid `T`.
///
/// The walk runs on a thread of its own and hands each piece over as it finds it, so
/// the two parses of the text overlap instead of adding up.
pub fn read_in_pieces<'de, T: Deserialize<'de>>(text: &'de str) -> Option<T> {
    std::thread::scope(|scope| {
        let (found, pieces) = mpsc::sync_channel(4096);
        let walker = scope.spawn(move || walk(text, |piece| found.send(piece).ok()));
        let root = Node {
            text,
            pieces: &pieces,
            shape: Shape::Root,
        };
        // Through serde_path_to_error, as the whole-document read goes: each piece's
        // values then deserialise with the very code that reads them whole (without
        // it, every config type's code is compiled a second time: +0.34 MB of binary).
        let read = serde_path_to_error::deserialize(root).ok();
        drop(pieces); // a reader that stopped early must not leave the walker waiting
        let whole_document_fits = matches!(walker.join(), Ok(Some(())));
        read.filter(|_| whole_document_fits)
    })
}

/// The deepest nesting a piece may have. serde_yaml stops at 128 levels from the
/// document's root; a piece read on its own starts one or two levels higher, so a
/// document nested near that limit could read where the whole would not.
const MAX_DEPTH: usize = 64;

/// What the walk finds, in document order, as byte ranges of the text.
#[derive(Debug, PartialEq, Eq)]
enum Found {
    /// A top-level key.
    Key(Range<usize>),
    /// Its value, from the key's first byte to the value's end: a mapping of one entry.
    Whole(Range<usize>),
    /// Its value is a block list; its items follow, then `ItemsEnd`.
    Items,
    /// An item, from the start of its `- ` line to the item's end.
    Item(Range<usize>),
    ItemsEnd,
    /// The end of the top-level mapping.
    End,
}

/// Walks the document, handing each piece to `found` (which returns `None` to stop);
/// `Some` if the whole document can be read in pieces.
fn walk(text: &str, mut found: impl FnMut(Found) -> Option<()>) -> Option<()> {
    if text.starts_with('\u{feff}') {
        return None; // libyaml's indices would not count the byte-order mark
    }
    let mut events = Events::new(text).map_while(Result::ok);
    let mut next = move || events.next();
    expect(next()?, Kind::StreamStart)?;
    expect(next()?, Kind::DocumentStart { directives: false })?;
    let root = next()?;
    if root.kind != (Kind::MappingStart { block: true }) || root.tagged {
        return None;
    }
    loop {
        let key = next()?;
        match key.kind {
            Kind::MappingEnd => break,
            Kind::Scalar if key.start.column == 0 => {}
            _ => return None,
        }
        found(Found::Key(key.start.index..key.end.index))?;
        let first = next()?;
        if first.kind == (Kind::SequenceStart { block: true }) && !first.tagged {
            found(Found::Items)?;
            loop {
                let item = next()?;
                if item.kind == Kind::SequenceEnd {
                    break;
                }
                let end = node_end(&mut next, item)?;
                found(Found::Item(line_of_dash(text, item.start.index)?..end))?;
            }
            found(Found::ItemsEnd)?;
        } else {
            found(Found::Whole(key.start.index..node_end(&mut next, first)?))?;
        }
    }
    found(Found::End)?;
    expect(next()?, Kind::DocumentEnd)?;
    expect(next()?, Kind::StreamEnd)
}

fn expect(event: Event, kind: Kind) -> Option<()> {
    (event.kind == kind).then_some(())
}

/// Consumes the events of the node that starts with `first`; returns where it ends.
fn node_end(next: &mut impl FnMut() -> Option<Event>, first: Event) -> Option<usize> {
    let mut depth = 0usize;
    let mut event = first;
    loop {
        match event.kind {
            Kind::Scalar => {}
            Kind::SequenceStart { .. } | Kind::MappingStart { .. } => {
                depth += 1;
                if depth > MAX_DEPTH {
                    return None;
                }
            }
            Kind::SequenceEnd | Kind::MappingEnd => depth = depth.checked_sub(1)?,
            _ => return None, // an alias, or the document's end
        }
        if depth == 0 {
            return Some(event.end.index);
        }
        event = next()?;
    }
}

/// The start of the line of the item that starts at `start`, when that line is only
/// indentation, the item's `-` and blanks before it.
fn line_of_dash(text: &str, start: usize) -> Option<usize> {
    let before = text.get(..start)?;
    let line = before.rfind('\n').map_or(0, |i| i + 1);
    let after_dash = before[line..].trim_start_matches(' ').strip_prefix('-')?;
    (!after_dash.is_empty() && after_dash.bytes().all(|b| b == b' ' || b == b'\t')).then_some(line)
}

/// Whatever stops the piecewise read; never shown, since serde_yaml then reads the
/// whole text and reports the error itself.
#[derive(Debug)]
struct ReadWhole;

impl fmt::Display for ReadWhole {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("read the whole document with serde_yaml")
    }
}

impl std::error::Error for ReadWhole {}

impl de::Error for ReadWhole {
    fn custom<T: fmt::Display>(_: T) -> Self {
        ReadWhole
    }
}

impl From<serde_yaml::Error> for ReadWhole {
    fn from(_: serde_yaml::Error) -> Self {
        ReadWhole
    }
}

/// The top-level mapping, or one of its block lists: what serde_yaml does with an
/// untagged mapping or sequence, for every `deserialize_*` a type may call, except
/// that each piece is handed to serde_yaml and any failure is [`ReadWhole`].
struct Node<'p, 'de> {
    text: &'de str,
    pieces: &'p Receiver<Found>,
    shape: Shape,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Shape {
    Root,
    Items,
}

impl<'p, 'de> Node<'p, 'de> {
    /// serde_yaml over one piece of the text. libyaml's marks are byte indices on
    /// character boundaries; were one ever not, the text is read whole, not sliced
    /// into a panic.
    fn piece(&self, range: Range<usize>) -> Result<serde_yaml::Deserializer<'de>, ReadWhole> {
        let text = self.text.get(range).ok_or(ReadWhole)?;
        Ok(serde_yaml::Deserializer::from_str(text))
    }

    fn next(&self) -> Result<Found, ReadWhole> {
        self.pieces.recv().map_err(|_| ReadWhole) // the walk stopped: read whole
    }

    /// What closes this node's pieces.
    fn end(&self) -> Found {
        match self.shape {
            Shape::Root => Found::End,
            Shape::Items => Found::ItemsEnd,
        }
    }

    fn visit<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ReadWhole> {
        let (value, ended) = match self.shape {
            Shape::Root => {
                let mut map = Entries {
                    node: &self,
                    value_next: false,
                    ended: false,
                };
                let value = visitor.visit_map(&mut map)?;
                if map.value_next {
                    return Err(ReadWhole);
                }
                (value, map.ended)
            }
            Shape::Items => {
                let mut seq = Items {
                    node: &self,
                    ended: false,
                };
                (visitor.visit_seq(&mut seq)?, seq.ended)
            }
        };
        // serde_yaml fails when a visitor leaves entries or items unread.
        if ended || self.next()? == self.end() {
            Ok(value)
        } else {
            Err(ReadWhole)
        }
    }

    fn visit_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ReadWhole> {
        match self.shape {
            Shape::Root => self.visit(visitor),
            Shape::Items => Err(ReadWhole),
        }
    }

    fn visit_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ReadWhole> {
        match self.shape {
            Shape::Items => self.visit(visitor),
            Shape::Root => Err(ReadWhole),
        }
    }

    fn visit_some<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ReadWhole> {
        visitor.visit_some(self)
    }

    fn visit_newtype_struct<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ReadWhole> {
        visitor.visit_newtype_struct(self)
    }

    /// Ignored: serde_yaml skips the node without looking at it; its pieces are passed
    /// over (a top-level list's items hold no `End`).
    fn visit_unit<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ReadWhole> {
        while self.next()? != self.end() {}
        visitor.visit_unit()
    }

    /// What serde_yaml refuses for a mapping or a sequence (a scalar type, an enum
    /// without a tag, bytes).
    fn refuse<V: Visitor<'de>>(self, _: V) -> Result<V::Value, ReadWhole> {
        Err(ReadWhole)
    }
}

/// Each `deserialize_*` method, and what serde_yaml does with it for an untagged
/// mapping or sequence.
macro_rules! deserialize {
    ($($method:ident($($arg:ty),*) => $how:ident;)*) => {$(
        fn $method<V: Visitor<'de>>(self, $(_: $arg,)* visitor: V) -> Result<V::Value, ReadWhole> {
            self.$how(visitor)
        }
    )*};
}

impl<'de> Deserializer<'de> for Node<'_, 'de> {
    type Error = ReadWhole;

    deserialize! {
        deserialize_any() => visit;
        deserialize_map() => visit_map;
        deserialize_struct(&'static str, &'static [&'static str]) => visit_map;
        deserialize_seq() => visit_seq;
        deserialize_tuple(usize) => visit_seq;
        deserialize_tuple_struct(&'static str, usize) => visit_seq;
        deserialize_option() => visit_some;
        deserialize_newtype_struct(&'static str) => visit_newtype_struct;
        deserialize_ignored_any() => visit_unit;
        deserialize_bool() => refuse; deserialize_i8() => refuse; deserialize_i16() => refuse;
        deserialize_i32() => refuse; deserialize_i64() => refuse; deserialize_i128() => refuse;
        deserialize_u8() => refuse; deserialize_u16() => refuse; deserialize_u32() => refuse;
        deserialize_u64() => refuse; deserialize_u128() => refuse; deserialize_f32() => refuse;
        deserialize_f64() => refuse; deserialize_char() => refuse; deserialize_str() => refuse;
        deserialize_string() => refuse; deserialize_bytes() => refuse;
        deserialize_byte_buf() => refuse; deserialize_unit() => refuse;
        deserialize_identifier() => refuse; deserialize_unit_struct(&'static str) => refuse;
        deserialize_enum(&'static str, &'static [&'static str]) => refuse;
    }
}

struct Entries<'n, 'p, 'de> {
    node: &'n Node<'p, 'de>,
    /// A key was read; its value is next.
    value_next: bool,
    ended: bool,
}

impl<'de> de::MapAccess<'de> for Entries<'_, '_, 'de> {
    type Error = ReadWhole;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, ReadWhole> {
        if self.value_next {
            return Err(ReadWhole); // a key asked for instead of a value
        }
        if self.ended {
            return Ok(None);
        }
        match self.node.next()? {
            Found::Key(range) => {
                self.value_next = true;
                let key = self.node.piece(range)?;
                Ok(Some(seed.deserialize(key)?))
            }
            Found::End => {
                self.ended = true;
                Ok(None)
            }
            _ => Err(ReadWhole),
        }
    }

    fn next_value_seed<S: DeserializeSeed<'de>>(&mut self, seed: S) -> Result<S::Value, ReadWhole> {
        if !std::mem::take(&mut self.value_next) {
            return Err(ReadWhole);
        }
        match self.node.next()? {
            Found::Whole(range) => {
                let piece = self.node.piece(range)?;
                Ok(piece.deserialize_map(OnlyOne(seed))?)
            }
            Found::Items => seed.deserialize(Node {
                text: self.node.text,
                pieces: self.node.pieces,
                shape: Shape::Items,
            }),
            _ => Err(ReadWhole),
        }
    }
}

struct Items<'n, 'p, 'de> {
    node: &'n Node<'p, 'de>,
    ended: bool,
}

impl<'de> de::SeqAccess<'de> for Items<'_, '_, 'de> {
    type Error = ReadWhole;

    fn next_element_seed<S: DeserializeSeed<'de>>(
        &mut self,
        seed: S,
    ) -> Result<Option<S::Value>, ReadWhole> {
        if self.ended {
            return Ok(None);
        }
        match self.node.next()? {
            Found::Item(range) => {
                let piece = self.node.piece(range)?;
                Ok(Some(piece.deserialize_seq(OnlyOne(seed))?))
            }
            Found::ItemsEnd => {
                self.ended = true;
                Ok(None)
            }
            _ => Err(ReadWhole),
        }
    }
}

/// Reads a piece's one entry's value, or its one item, with `seed`.
struct OnlyOne<S>(S);

impl<'de, S: DeserializeSeed<'de>> Visitor<'de> for OnlyOne<S> {
    type Value = S::Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a piece of the document with one entry or item")
    }

    fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<S::Value, A::Error> {
        map.next_key::<IgnoredAny>()?
            .ok_or_else(|| de::Error::custom("an empty piece"))?;
        let value = map.next_value_seed(self.0)?;
        match map.next_key::<IgnoredAny>()? {
            None => Ok(value),
            Some(_) => Err(de::Error::custom("a piece of more than one entry")),
        }
    }

    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<S::Value, A::Error> {
        let value = seq
            .next_element_seed(self.0)?
            .ok_or_else(|| de::Error::custom("an empty piece"))?;
        match seq.next_element::<IgnoredAny>()? {
            None => Ok(value),
            Some(_) => Err(de::Error::custom("a piece of more than one item")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::FileConfig;

    fn fits(text: &str) -> bool {
        walk(text, |_| Some(())).is_some()
    }

    /// Read in pieces, and as serde_yaml reads the whole text, into serde_yaml's own
    /// `Value` (every scalar type, tags as tagged values).
    fn both(text: &str) -> (Option<serde_yaml::Value>, serde_yaml::Value) {
        let whole = serde_yaml::from_str(text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        (read_in_pieces(text), whole)
    }

    fn same_in_pieces(text: &str) {
        let (pieces, whole) = both(text);
        assert!(fits(text), "expected to be read in pieces:\n{text}");
        assert_eq!(pieces.as_ref(), Some(&whole), "\n{text}");
    }

    /// Documents whose every piece must read as in the whole.
    const TRICKY: &[&str] = &[
        // scalars as serde_yaml 0.9 resolves them
        "a: 1\nb: 0x1f\nc: 0o17\nd: +12\ne: 1.5e3\nf: .inf\ng: -.Inf\nh: .nan\ni: ~\nj:\nk: null\n",
        "a: true\nb: True\nc: yes\nd: on\ne: 012\nf: '012'\ng: \"x\\ty\"\nh: 1_000\ni: 2001-12-14\n",
        // tags on values and items
        "a: !!str 123\nb: !!int '7'\nc: !Variant { x: 1 }\nd:\n  - !!float 1\n  - !Unit\n",
        // block scalars, with explicit indentation and chomping, at each level
        "a: |\n  one\n   two\n\nb: >-\n  folded\n  text\nc: |2\n    four\nd: |+\n  keep\n\n\ne: x\n",
        "items:\n  - |1\n    deep\n  - >2-\n     x\n  - k: |3\n        y\n",
        // indentless and indented lists, flow and block items, compact nesting
        "routes:\n- a\n- { b: 1, c: [1, 2] }\n- - x\n  - y\nconsumers:\n  - username: u\n    labels:\n      k: v\n  -   spaced: 1\n",
        // multi-line plain and quoted scalars, comments everywhere
        "# head\na: one\n  two\n  three   # trailing\nb: 'single\n  quoted'\nl:\n  # before\n  - \"double\n    quoted\"  # after\n  # between\n  - x\n# tail\n",
        // anchors without aliases, quoted keys
        "\"quoted key\": &a 1\n'single': [&b x]\nl:\n  - &c { k: v }\n  - &d\n    k: w\n",
        // document markers, CRLF, non-ASCII before nodes
        "---\na: 1\r\nl:\r\n  - é: ü\r\n  - \"ç\": [ä, ö]\r\n...\n",
        "ключ: значение\nсписок:\n  - элемент: 1\n  - { 名前: 値 }\n",
        // null items
        "l:\n  - ~\n  - null\n  - x\n",
        // flow collections across lines
        "l: [ a,\n  b, { c: d,\n   e: f } ]\nm: { x: 1,\n  y: 2 }\n",
    ];

    /// Valid documents the reader leaves whole, though serde_yaml reads them.
    const LEFT_WHOLE: &[&str] = &[
        "? [complex]\n: value\n", // a key that does not start its line
        "l:\n  -\n  - x\n",       // an item with nothing after its dash
        "l:\n  - # a comment before the item\n    k: v\n",
    ];

    #[test]
    fn every_piece_reads_as_serde_yaml_reads_it_in_the_whole_document() {
        for text in TRICKY {
            same_in_pieces(text);
        }
        for text in LEFT_WHOLE {
            let (pieces, _) = both(text);
            assert!(pieces.is_none(), "{text}");
        }
    }

    #[test]
    fn a_config_reads_the_same_in_pieces_as_whole() {
        let text = "\
listen: { grpc: 127.0.0.1:1, http: 127.0.0.1:2 }
admin:
  api_key: k
routes:
  - { id: r1, uri: /a/*, plugins: { jwt-auth: {} } }
  - id: r2
    uri: /b
    methods: [GET]
consumers:
- username: alice
  labels: { custom_id: c1 }
  credentials:
    - id: one
      plugins:
        jwt-auth: { key: ak, secret: s }
- { username: bob }
";
        let pieces: FileConfig = read_in_pieces(text).expect("read in pieces");
        let whole: FileConfig = serde_yaml::from_str(text).unwrap();
        assert_eq!(format!("{pieces:?}"), format!("{whole:?}"));
        assert_eq!(pieces.consumers.len(), 2);
        assert_eq!(pieces.routes.len(), 2);
    }

    #[test]
    fn what_a_piece_cannot_see_goes_whole_to_serde_yaml() {
        for text in [
            "a: &x 1\nb: *x\n",              // an alias
            "l:\n  - &x { k: v }\n  - *x\n", // an alias across items
            "%YAML 1.1\n---\na: 1\n",        // a directive
            "%TAG ! tag:example.com,2000:\n---\na: !x 1\n",
            "a: 1\n---\nb: 2\n",  // two documents
            "{ a: 1, b: [2] }\n", // a flow mapping at the top
            "!!map\na: 1\n",      // a tagged top-level mapping
            "- a\n- b\n",         // not a mapping
            "",                   // no document
            "\u{feff}a: 1\n",     // a byte-order mark
            "a: [unclosed\n",     // not YAML
        ] {
            assert!(!fits(text), "{text:?}");
        }
        let deep = format!(
            "a: {}1{}\n",
            "[".repeat(MAX_DEPTH + 1),
            "]".repeat(MAX_DEPTH + 1)
        );
        assert!(!fits(&deep));
        let deep_enough = format!("a: {}1{}\n", "[".repeat(MAX_DEPTH), "]".repeat(MAX_DEPTH));
        same_in_pieces(&deep_enough);
    }

    #[test]
    fn any_error_leaves_the_report_to_serde_yaml() {
        // Each reads in pieces up to its error; the whole-document read then gives the
        // error its path and line.
        for text in [
            "routez: []\n",
            "consumers:\n  - username: a\n  - username: b\n    labels: 7\n",
            "listen: { grpc: not-an-address }\n",
            "routes:\n  - { id: r1 }\n  - [not, a, route]\n",
        ] {
            assert!(fits(text), "{text}");
            assert!(read_in_pieces::<FileConfig>(text).is_none(), "{text}");
        }
        let err = FileConfig::parse("routes:\n  - { id: r1 }\nroutez: []\n", "p.yaml").unwrap_err();
        assert!(
            err.to_string().contains("unknown field `routez`")
                && err.to_string().contains("line 3"),
            "{err}"
        );
    }

    #[test]
    fn an_ignored_list_is_passed_over_and_an_early_stop_does_not_wait_for_the_walk() {
        #[derive(Deserialize, Debug, PartialEq)]
        struct Partial {
            b: u32,
        }
        let text = "a:\n  - 1\n  - [2, 3]\nb: 4\nc: { d: 5 }\n";
        assert_eq!(read_in_pieces::<Partial>(text), Some(Partial { b: 4 }));
        assert_eq!(
            read_in_pieces::<Partial>(text),
            serde_yaml::from_str(text).ok()
        );

        // An error in the first of 20 000 items: the reader stops while the walk is
        // blocked on a full channel, and must still return.
        let mut long = String::from("consumers:\n  - { username: a, labels: 7 }\n");
        for i in 0..20_000 {
            long.push_str(&format!("  - {{ username: u{i} }}\n"));
        }
        assert!(fits(&long));
        assert!(read_in_pieces::<FileConfig>(&long).is_none());
    }

    /// Every YAML file this repository ships (Envoy configs, Kubernetes manifests, the
    /// default config, test fixtures) reads in pieces exactly as whole, or goes whole.
    #[test]
    fn the_repositorys_own_yaml_files_read_the_same() {
        fn walk(dir: &std::path::Path, found: &mut Vec<std::path::PathBuf>) {
            for entry in std::fs::read_dir(dir).unwrap().flatten() {
                let path = entry.path();
                let name = entry.file_name();
                if path.is_dir() {
                    if !matches!(name.to_str(), Some("target" | "node_modules" | ".git")) {
                        walk(&path, found);
                    }
                } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
                    found.push(path);
                }
            }
        }
        let mut files = Vec::new();
        walk(std::path::Path::new(env!("CARGO_MANIFEST_DIR")), &mut files);
        let mut in_pieces = 0;
        for path in &files {
            let text = std::fs::read_to_string(path).unwrap();
            let whole: Result<serde_yaml::Value, _> = serde_yaml::from_str(&text);
            match (whole, read_in_pieces::<serde_yaml::Value>(&text)) {
                (Ok(whole), Some(pieces)) => {
                    assert_eq!(pieces, whole, "{}", path.display());
                    in_pieces += 1;
                }
                (Err(e), Some(_)) => panic!("{} reads in pieces, not whole: {e}", path.display()),
                (_, None) => {}
            }
        }
        assert!(
            in_pieces >= 10,
            "{in_pieces} of {} files read in pieces",
            files.len()
        );
    }
}
