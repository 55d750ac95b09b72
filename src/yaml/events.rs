//! libyaml's event stream over a borrowed text, as serde_yaml 0.9 parses it (the same
//! `unsafe-libyaml` parser, UTF-8), reduced to what [`super::walk`] looks at: each
//! event's kind and where it starts and ends. Nothing of the document is kept.

use std::mem::MaybeUninit;

/// A position in the text: a byte index, and libyaml's 0-based column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Mark {
    pub index: usize,
    pub column: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    StreamStart,
    StreamEnd,
    /// `directives`: a `%YAML` or `%TAG` line, which changes how the rest reads.
    DocumentStart {
        directives: bool,
    },
    DocumentEnd,
    Alias,
    Scalar,
    SequenceStart {
        block: bool,
    },
    SequenceEnd,
    MappingStart {
        block: bool,
    },
    MappingEnd,
}

#[derive(Debug, Clone, Copy)]
pub(super) struct Event {
    pub kind: Kind,
    /// A node's tag (`!!str`, `!Variant`), which serde_yaml reads as a type or variant.
    pub tagged: bool,
    pub start: Mark,
    pub end: Mark,
}

/// libyaml's parser over `text`. Boxed because libyaml keeps a pointer to the parser
/// in itself for string input; never moved out of the box.
pub(super) struct Events<'a> {
    parser: Box<MaybeUninit<unsafe_libyaml::yaml_parser_t>>,
    _text: &'a str,
    done: bool,
}

impl<'a> Events<'a> {
    pub fn new(text: &'a str) -> Self {
        let mut parser = Box::new(MaybeUninit::<unsafe_libyaml::yaml_parser_t>::uninit());
        #[allow(unsafe_code)]
        // SAFETY: initialize fills the parser in place (it fails only when its buffers
        // cannot be allocated, and we stop there); the input pointer and length
        // describe `text`, which outlives `self` ('a); the parser stays at this heap
        // address until `Drop` deletes it.
        unsafe {
            let p = parser.as_mut_ptr();
            if unsafe_libyaml::yaml_parser_initialize(p).fail {
                std::alloc::handle_alloc_error(std::alloc::Layout::new::<
                    unsafe_libyaml::yaml_parser_t,
                >());
            }
            unsafe_libyaml::yaml_parser_set_encoding(p, unsafe_libyaml::YAML_UTF8_ENCODING);
            unsafe_libyaml::yaml_parser_set_input_string(p, text.as_ptr(), text.len() as u64);
        }
        Events {
            parser,
            _text: text,
            done: false,
        }
    }
}

impl Iterator for Events<'_> {
    /// `Err(())`: the text is not YAML here; serde_yaml reports where and why.
    type Item = Result<Event, ()>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let mut raw = MaybeUninit::<unsafe_libyaml::yaml_event_t>::uninit();
        #[allow(unsafe_code)]
        // SAFETY: the parser was initialised in `new` and is not shared; `parse` either
        // fails (and writes no event to delete) or fills `raw`, whose union member is
        // the one `type_` names, read before `yaml_event_delete` frees what it owns.
        let event = unsafe {
            let p = self.parser.as_mut_ptr();
            let e = raw.as_mut_ptr();
            if unsafe_libyaml::yaml_parser_parse(p, e).fail {
                self.done = true;
                return Some(Err(()));
            }
            let e = &mut *e;
            let (kind, tag) = match e.type_ {
                unsafe_libyaml::YAML_STREAM_START_EVENT => {
                    (Kind::StreamStart, std::ptr::null_mut())
                }
                unsafe_libyaml::YAML_STREAM_END_EVENT => (Kind::StreamEnd, std::ptr::null_mut()),
                unsafe_libyaml::YAML_DOCUMENT_START_EVENT => {
                    let d = e.data.document_start;
                    let directives = !d.version_directive.is_null()
                        || d.tag_directives.start != d.tag_directives.end;
                    (Kind::DocumentStart { directives }, std::ptr::null_mut())
                }
                unsafe_libyaml::YAML_DOCUMENT_END_EVENT => {
                    (Kind::DocumentEnd, std::ptr::null_mut())
                }
                unsafe_libyaml::YAML_ALIAS_EVENT => (Kind::Alias, std::ptr::null_mut()),
                unsafe_libyaml::YAML_SCALAR_EVENT => (Kind::Scalar, e.data.scalar.tag),
                unsafe_libyaml::YAML_SEQUENCE_START_EVENT => {
                    let s = e.data.sequence_start;
                    let block = s.style == unsafe_libyaml::YAML_BLOCK_SEQUENCE_STYLE;
                    (Kind::SequenceStart { block }, s.tag)
                }
                unsafe_libyaml::YAML_SEQUENCE_END_EVENT => {
                    (Kind::SequenceEnd, std::ptr::null_mut())
                }
                unsafe_libyaml::YAML_MAPPING_START_EVENT => {
                    let m = e.data.mapping_start;
                    let block = m.style == unsafe_libyaml::YAML_BLOCK_MAPPING_STYLE;
                    (Kind::MappingStart { block }, m.tag)
                }
                unsafe_libyaml::YAML_MAPPING_END_EVENT => (Kind::MappingEnd, std::ptr::null_mut()),
                _ => {
                    unsafe_libyaml::yaml_event_delete(e);
                    self.done = true;
                    return Some(Err(()));
                }
            };
            let mark = |m: unsafe_libyaml::yaml_mark_t| Mark {
                index: m.index as usize,
                column: m.column as usize,
            };
            let event = Event {
                kind,
                tagged: !tag.is_null(),
                start: mark(e.start_mark),
                end: mark(e.end_mark),
            };
            unsafe_libyaml::yaml_event_delete(e);
            event
        };
        if event.kind == Kind::StreamEnd {
            self.done = true;
        }
        Some(Ok(event))
    }
}

impl Drop for Events<'_> {
    fn drop(&mut self) {
        #[allow(unsafe_code)]
        // SAFETY: initialised in `new`, deleted once, here.
        unsafe {
            unsafe_libyaml::yaml_parser_delete(self.parser.as_mut_ptr());
        }
    }
}
