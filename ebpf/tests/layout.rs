//! Proves the Rust map ABI and the C header agree, from the BTF of the compiled objects.

use std::collections::BTreeMap;

use mesh_ebpf::abi::{self, LAYOUT_OBJ, POLICY_OBJ, SOCK_LB_OBJ};
use object::{Object, ObjectSection, ObjectSymbol};

/// A minimal reader of the BTF type section (enough for structs, enums, typedefs,
/// pointers, arrays, variables and data sections).
#[derive(Debug)]
struct Btf {
    types: Vec<Ty>, // index = type id; 0 = void
}

#[derive(Debug, Clone)]
enum Ty {
    Void,
    Int {
        size: u32,
    },
    Ptr {
        target: u32,
    },
    Array {
        elem: u32,
        nelems: u32,
    },
    Struct {
        name: String,
        size: u32,
        members: Vec<Member>,
    },
    Enum {
        name: String,
        size: u32,
        values: Vec<(String, u32)>,
    },
    Alias {
        name: String,
        target: u32,
    }, // typedef, const, volatile, restrict, type tag
    Var {
        name: String,
        target: u32,
    },
    DataSec {
        name: String,
        vars: Vec<u32>,
    },
    Other,
}

#[derive(Debug, Clone)]
struct Member {
    name: String,
    ty: u32,
    bit_offset: u32,
    bitfield_size: u32,
}

impl Btf {
    fn from_object(obj: &[u8]) -> Self {
        let file = object::File::parse(obj).expect("an ELF object");
        let sec = file
            .section_by_name(".BTF")
            .expect("a .BTF section (clang -g)");
        Self::parse(sec.data().expect(".BTF data"))
    }

    fn parse(d: &[u8]) -> Self {
        let u16_at = |o: usize| u16::from_le_bytes([d[o], d[o + 1]]);
        let u32_at = |o: usize| u32::from_le_bytes([d[o], d[o + 1], d[o + 2], d[o + 3]]);
        assert_eq!(u16_at(0), 0xeb9f, "BTF magic (little-endian object)");
        let hdr_len = u32_at(4) as usize;
        let (type_off, type_len) = (u32_at(8) as usize, u32_at(12) as usize);
        let str_off = u32_at(16) as usize;
        let strings = &d[hdr_len + str_off..];
        let name = |off: u32| -> String {
            let s = &strings[off as usize..];
            let end = s.iter().position(|&b| b == 0).expect("NUL-terminated name");
            String::from_utf8(s[..end].to_vec()).expect("UTF-8 name")
        };
        let mut types = vec![Ty::Void];
        let mut o = hdr_len + type_off;
        let end = o + type_len;
        while o < end {
            let (name_off, info, size_or_type) = (u32_at(o), u32_at(o + 4), u32_at(o + 8));
            o += 12;
            let vlen = (info & 0xffff) as usize;
            let kind = (info >> 24) & 0x1f;
            let kind_flag = info >> 31 == 1;
            let ty = match kind {
                1 => {
                    o += 4;
                    Ty::Int { size: size_or_type }
                }
                2 => Ty::Ptr {
                    target: size_or_type,
                },
                3 => {
                    let t = Ty::Array {
                        elem: u32_at(o),
                        nelems: u32_at(o + 8),
                    };
                    o += 12;
                    t
                }
                4 | 5 => {
                    let mut members = Vec::new();
                    for _ in 0..vlen {
                        let off = u32_at(o + 8);
                        let (bit_offset, bitfield_size) = if kind_flag {
                            (off & 0xff_ffff, off >> 24)
                        } else {
                            (off, 0)
                        };
                        members.push(Member {
                            name: name(u32_at(o)),
                            ty: u32_at(o + 4),
                            bit_offset,
                            bitfield_size,
                        });
                        o += 12;
                    }
                    Ty::Struct {
                        name: name(name_off),
                        size: size_or_type,
                        members,
                    }
                }
                6 => {
                    let mut values = Vec::new();
                    for _ in 0..vlen {
                        values.push((name(u32_at(o)), u32_at(o + 4)));
                        o += 8;
                    }
                    Ty::Enum {
                        name: name(name_off),
                        size: size_or_type,
                        values,
                    }
                }
                8 | 9 | 10 | 11 | 18 => Ty::Alias {
                    name: name(name_off),
                    target: size_or_type,
                },
                13 => {
                    o += 8 * vlen;
                    Ty::Other
                }
                14 => {
                    o += 4;
                    Ty::Var {
                        name: name(name_off),
                        target: size_or_type,
                    }
                }
                15 => {
                    let mut vars = Vec::new();
                    for _ in 0..vlen {
                        vars.push(u32_at(o));
                        o += 12;
                    }
                    Ty::DataSec {
                        name: name(name_off),
                        vars,
                    }
                }
                17 => {
                    o += 4;
                    Ty::Other
                }
                19 => {
                    o += 12 * vlen;
                    Ty::Other
                }
                7 | 12 | 16 => Ty::Other,
                k => panic!("BTF kind {k} not understood by this reader"),
            };
            types.push(ty);
        }
        Self { types }
    }

    fn ty(&self, id: u32) -> &Ty {
        &self.types[id as usize]
    }

    fn size(&self, id: u32) -> u32 {
        match self.ty(id) {
            Ty::Int { size } | Ty::Struct { size, .. } | Ty::Enum { size, .. } => *size,
            Ty::Ptr { .. } => 8,
            Ty::Array { elem, nelems } => self.size(*elem) * nelems,
            Ty::Alias { target, .. } | Ty::Var { target, .. } => self.size(*target),
            t => panic!("no size for {t:?}"),
        }
    }

    /// The name a C declaration uses for type `id` (struct/enum/typedef name).
    fn type_name(&self, id: u32) -> String {
        match self.ty(id) {
            Ty::Struct { name, .. } | Ty::Enum { name, .. } => name.clone(),
            Ty::Alias { name, target } if name.is_empty() => self.type_name(*target),
            Ty::Alias { name, .. } => name.clone(),
            t => format!("{t:?}"),
        }
    }

    fn structs(&self) -> BTreeMap<String, (u32, Vec<Member>)> {
        self.types
            .iter()
            .filter_map(|t| match t {
                Ty::Struct {
                    name,
                    size,
                    members,
                } if !name.is_empty() => Some((name.clone(), (*size, members.clone()))),
                _ => None,
            })
            .collect()
    }

    /// Every map of the `.maps` section: name → (key type id, value type id).
    fn maps(&self) -> BTreeMap<String, (Option<u32>, Option<u32>)> {
        let mut out = BTreeMap::new();
        for t in &self.types {
            let Ty::DataSec { name, vars } = t else {
                continue;
            };
            if name != ".maps" {
                continue;
            }
            for &v in vars {
                let Ty::Var { name, target } = self.ty(v) else {
                    panic!("a .maps entry that is not a variable");
                };
                let Ty::Struct { members, .. } = self.ty(*target) else {
                    panic!("map {name} is not a struct definition");
                };
                let pointee = |field: &str| {
                    members
                        .iter()
                        .find(|m| m.name == field)
                        .map(|m| match self.ty(m.ty) {
                            Ty::Ptr { target } => *target,
                            t => panic!("map {name}.{field} is not __type(): {t:?}"),
                        })
                };
                out.insert(name.clone(), (pointee("key"), pointee("value")));
            }
        }
        out
    }
}

#[test]
fn every_rust_struct_matches_its_c_struct() {
    let btf = Btf::from_object(LAYOUT_OBJ);
    let c_structs = btf.structs();
    let layouts = abi::struct_layouts();
    for l in &layouts {
        let (size, members) = c_structs
            .get(l.c_name)
            .unwrap_or_else(|| panic!("struct {} missing from mesh.h / layout.c", l.c_name));
        assert_eq!(
            *size as usize, l.size,
            "size of struct {} (C) vs its Rust mirror",
            l.c_name
        );
        let c_fields: Vec<(String, usize, usize)> = members
            .iter()
            .map(|m| {
                assert_eq!(
                    m.bitfield_size, 0,
                    "{}.{}: no bitfields in the ABI",
                    l.c_name, m.name
                );
                assert_eq!(m.bit_offset % 8, 0);
                (
                    m.name.clone(),
                    (m.bit_offset / 8) as usize,
                    btf.size(m.ty) as usize,
                )
            })
            .collect();
        let rust_fields: Vec<(String, usize, usize)> = l
            .fields
            .iter()
            .map(|(n, o, s)| ((*n).to_owned(), *o, *s))
            .collect();
        assert_eq!(
            c_fields, rust_fields,
            "fields (name, offset, size) of struct {}: C left, Rust right",
            l.c_name
        );
    }
    // Every struct of the header has a mirror (the anchor itself excepted).
    let mirrored: Vec<&str> = layouts.iter().map(|l| l.c_name).collect();
    for name in c_structs
        .keys()
        .filter(|n| n.starts_with("mesh_") && *n != "mesh_layout_anchor")
    {
        assert!(
            mirrored.contains(&name.as_str()),
            "struct {name} has no Rust mirror"
        );
    }
}

#[test]
fn every_rust_constant_matches_its_c_enum() {
    let btf = Btf::from_object(LAYOUT_OBJ);
    for (enum_name, rust_values) in abi::enum_values() {
        let c_values = btf
            .types
            .iter()
            .find_map(|t| match t {
                Ty::Enum { name, values, size } if name == enum_name => {
                    assert_eq!(*size, 4);
                    Some(values.clone())
                }
                _ => None,
            })
            .unwrap_or_else(|| panic!("enum {enum_name} missing"));
        let rust: Vec<(String, u32)> = rust_values
            .iter()
            .map(|(n, v)| ((*n).to_owned(), *v))
            .collect();
        assert_eq!(c_values, rust, "enum {enum_name}: C left, Rust right");
    }
}

#[test]
fn every_map_uses_the_types_the_agent_writes() {
    let objects = [("sock_lb", SOCK_LB_OBJ), ("policy", POLICY_OBJ)];
    let abis = abi::map_abis();
    for (object, bytes) in objects {
        let btf = Btf::from_object(bytes);
        let maps = btf.maps();
        let ours: Vec<_> = abis.iter().filter(|m| m.object == object).collect();
        let names: Vec<&str> = ours.iter().map(|m| m.name).collect();
        assert_eq!(
            maps.keys().map(String::as_str).collect::<Vec<_>>(),
            {
                let mut n = names.clone();
                n.sort_unstable();
                n
            },
            "maps of {object}.bpf.o vs abi::map_abis()"
        );
        for m in ours {
            let (key, value) = maps[m.name];
            for (what, c, rust) in [("key", key, m.key), ("value", value, m.value)] {
                match (c, rust) {
                    (None, None) => {}
                    (Some(id), Some((name, size))) => {
                        assert_eq!(btf.type_name(id), name, "{} {what} type", m.name);
                        assert_eq!(btf.size(id) as usize, size, "{} {what} size", m.name);
                    }
                    (c, r) => panic!("{} {what}: C {c:?} vs Rust {r:?}", m.name),
                }
            }
        }
    }
}

#[test]
fn every_program_name_exists() {
    let cases = [
        (SOCK_LB_OBJ, abi::prog::SOCK_LB.to_vec()),
        (
            POLICY_OBJ,
            vec![abi::prog::FROM_ENDPOINT, abi::prog::TO_ENDPOINT],
        ),
    ];
    for (bytes, progs) in cases {
        let file = object::File::parse(bytes).expect("ELF");
        for p in progs {
            assert!(
                p.len() < 16,
                "{p}: kernel object names are 15 bytes at most"
            );
            assert!(
                file.symbols().any(|s| s.name() == Ok(p)),
                "program {p} not in the object"
            );
        }
    }
    for m in abi::map_abis() {
        assert!(
            m.name.len() < 16,
            "{}: pinned map names are 15 bytes at most",
            m.name
        );
    }
}

#[test]
fn the_reader_sees_a_layout_change() {
    // Guards the guard: a reader that saw no members would make the tests above vacuous.
    let btf = Btf::from_object(LAYOUT_OBJ);
    let (size, members) = &btf.structs()["mesh_drop_event"];
    assert_eq!(*size, 48);
    assert_eq!(members.len(), 14);
    assert_eq!(members[10].name, "proto");
    assert_eq!(members[10].bit_offset, 38 * 8);
}
