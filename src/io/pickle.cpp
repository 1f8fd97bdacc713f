#include "io/pickle.h"

#include <cstdio>
#include <cstring>
#include <unordered_map>

namespace segany::io {

namespace {

using Kind = PickleValue::Kind;

// Limits far above anything torch writes (a vit_h state_dict: ~600 tensors, 3 levels of MARK),
// low enough that a hostile pickle cannot make the loader use much more memory than its own size.
constexpr size_t kMaxStack = size_t{1} << 22;
constexpr size_t kMaxMarkDepth = 1000;
constexpr size_t kMaxGlobalName = 256;

// The storage classes torch pickles (as a persistent id) and the dtype each one holds.
struct StorageType {
  const char* name;
  DType dtype;
};
constexpr StorageType kStorageTypes[] = {
    {"torch.FloatStorage", DType::F32}, {"torch.DoubleStorage", DType::F64}, {"torch.HalfStorage", DType::F16},
    {"torch.BFloat16Storage", DType::BF16}, {"torch.LongStorage", DType::I64}, {"torch.IntStorage", DType::I32},
    {"torch.ShortStorage", DType::I16}, {"torch.CharStorage", DType::I8}, {"torch.ByteStorage", DType::U8},
    {"torch.BoolStorage", DType::Bool},
};

constexpr const char* kOrderedDict = "collections.OrderedDict";
constexpr const char* kRebuildTensor = "torch._utils._rebuild_tensor_v2";
constexpr const char* kRebuildParameter = "torch._utils._rebuild_parameter";
// dtype objects may appear as plain values (never called); they are inert.
constexpr const char* kDtypes[] = {"torch.float32", "torch.float64", "torch.float16", "torch.bfloat16",
                                   "torch.int64",   "torch.int32",   "torch.int16",   "torch.int8",
                                   "torch.uint8",   "torch.bool"};

const StorageType* storage_type(const std::string& global) {
  for (const StorageType& s : kStorageTypes)
    if (global == s.name) return &s;
  return nullptr;
}

bool allowed_global(const std::string& g) {
  if (g == kOrderedDict || g == kRebuildTensor || g == kRebuildParameter || storage_type(g)) return true;
  for (const char* d : kDtypes)
    if (g == d) return true;
  return false;
}

// Opcode names, for messages about opcodes this reader does not accept.
const char* opcode_name(uint8_t op) {
  switch (op) {
    case '(': return "MARK"; case '.': return "STOP"; case '0': return "POP"; case '1': return "POP_MARK";
    case '2': return "DUP"; case 'F': return "FLOAT"; case 'I': return "INT"; case 'J': return "BININT";
    case 'K': return "BININT1"; case 'L': return "LONG"; case 'M': return "BININT2"; case 'N': return "NONE";
    case 'P': return "PERSID"; case 'Q': return "BINPERSID"; case 'R': return "REDUCE"; case 'S': return "STRING";
    case 'T': return "BINSTRING"; case 'U': return "SHORT_BINSTRING"; case 'V': return "UNICODE";
    case 'X': return "BINUNICODE"; case 'a': return "APPEND"; case 'b': return "BUILD"; case 'c': return "GLOBAL";
    case 'd': return "DICT"; case '}': return "EMPTY_DICT"; case 'e': return "APPENDS"; case 'g': return "GET";
    case 'h': return "BINGET"; case 'i': return "INST"; case 'j': return "LONG_BINGET"; case 'l': return "LIST";
    case ']': return "EMPTY_LIST"; case 'o': return "OBJ"; case 'p': return "PUT"; case 'q': return "BINPUT";
    case 'r': return "LONG_BINPUT"; case 's': return "SETITEM"; case 't': return "TUPLE"; case ')': return "EMPTY_TUPLE";
    case 'u': return "SETITEMS"; case 'G': return "BINFLOAT"; case 0x80: return "PROTO"; case 0x81: return "NEWOBJ";
    case 0x82: return "EXT1"; case 0x83: return "EXT2"; case 0x84: return "EXT4"; case 0x85: return "TUPLE1";
    case 0x86: return "TUPLE2"; case 0x87: return "TUPLE3"; case 0x88: return "NEWTRUE"; case 0x89: return "NEWFALSE";
    case 0x8a: return "LONG1"; case 0x8b: return "LONG4"; case 'B': return "BINBYTES"; case 'C': return "SHORT_BINBYTES";
    case 0x8c: return "SHORT_BINUNICODE"; case 0x8d: return "BINUNICODE8"; case 0x8e: return "BINBYTES8";
    case 0x8f: return "EMPTY_SET"; case 0x90: return "ADDITEMS"; case 0x91: return "FROZENSET";
    case 0x92: return "NEWOBJ_EX"; case 0x93: return "STACK_GLOBAL"; case 0x94: return "MEMOIZE";
    case 0x95: return "FRAME"; case 0x96: return "BYTEARRAY8"; case 0x97: return "NEXT_BUFFER";
    case 0x98: return "READONLY_BUFFER";
  }
  return nullptr;
}

}  // namespace

const char* pickle_kind_name(Kind k) {
  switch (k) {
    case Kind::None: return "None";
    case Kind::Bool: return "bool";
    case Kind::Int: return "int";
    case Kind::Float: return "float";
    case Kind::String: return "string";
    case Kind::Tuple: return "tuple";
    case Kind::List: return "list";
    case Kind::Dict: return "dict";
    case Kind::Global: return "global";
    case Kind::Storage: return "storage";
    case Kind::Tensor: return "tensor";
  }
  return "?";
}

const PickleValue* PickleValue::get(const std::string& key) const {
  for (const auto& [k, v] : dict)
    if (k->kind == Kind::String && k->text == key) return v;
  return nullptr;
}

// The machine: a stack of values, a stack of MARK positions and a memo, driven one opcode at a
// time. Nothing here recurses (values live in a flat deque and refer to each other by pointer), so
// deep or even cyclic nesting costs memory in proportion to the input, never call stack.
class Unpickler {
 public:
  Unpickler(Pickle& out, std::span<const uint8_t> bytes, const std::string& source)
      : out_(out), bytes_(bytes), source_(source) {}

  const PickleValue* run() {
    while (true) {
      op_pos_ = pos_;
      const uint8_t op = read_u8();
      switch (op) {
        case 0x80: {  // PROTO
          const uint8_t v = read_u8();
          if (v < 2 || v > 5) fail("pickle protocol " + std::to_string(v) + " is not one torch.save writes");
          break;
        }
        case 0x95: read_uint(8); break;  // FRAME: a framing hint only; the bytes follow inline
        case 'c': {                      // GLOBAL module\nname\n
          std::string module = read_line(), name = read_line();
          push(global(module + "." + name));
          break;
        }
        case 0x93: {  // STACK_GLOBAL
          const PickleValue* name = pop();
          const PickleValue* module = pop();
          if (module->kind != Kind::String || name->kind != Kind::String)
            fail("STACK_GLOBAL needs two strings, found " + std::string(pickle_kind_name(module->kind)) + " and " +
                 pickle_kind_name(name->kind));
          push(global(module->text + "." + name->text));
          break;
        }
        case 'q': memo_put(read_uint(1)); break;  // BINPUT
        case 'r': memo_put(read_uint(4)); break;  // LONG_BINPUT
        case 0x94: memo_put(memo_.size()); break;  // MEMOIZE
        case 'h': push(memo_get(read_uint(1))); break;  // BINGET
        case 'j': push(memo_get(read_uint(4))); break;  // LONG_BINGET
        case ')': push(make(Kind::Tuple)); break;
        case ']': push(make(Kind::List)); break;
        case '}': push(make(Kind::Dict)); break;
        case '(':
          if (marks_.size() >= kMaxMarkDepth) fail("MARKs nest deeper than " + std::to_string(kMaxMarkDepth));
          marks_.push_back(stack_.size());
          break;
        case 't': {
          PickleValue* t = make(Kind::Tuple);
          t->items = pop_mark();
          push(t);
          break;
        }
        case 0x85: case 0x86: case 0x87: {  // TUPLE1..3
          PickleValue* t = make(Kind::Tuple);
          t->items.resize(op - 0x84u);
          for (size_t i = t->items.size(); i-- > 0;) t->items[i] = pop();
          push(t);
          break;
        }
        case 'X': push(string(read_uint(4))); break;     // BINUNICODE
        case 0x8c: push(string(read_uint(1))); break;    // SHORT_BINUNICODE
        case 0x8d: push(string(read_uint(8))); break;    // BINUNICODE8
        case 'J': push(integer(static_cast<int32_t>(read_uint(4)))); break;  // BININT
        case 'K': push(integer(read_uint(1))); break;   // BININT1
        case 'M': push(integer(read_uint(2))); break;   // BININT2
        case 0x8a: {                                     // LONG1: n bytes, little-endian two's complement
          const size_t n = read_uint(1);
          if (n > 8) fail("an integer of " + std::to_string(n) + " bytes does not fit in 64 bits");
          uint64_t v = n ? read_uint(n) : 0;
          if (n && n < 8 && (v >> (8 * n - 1) & 1)) v |= ~uint64_t{0} << (8 * n);  // sign-extend
          push(integer(static_cast<int64_t>(v)));
          break;
        }
        case 'G': {  // BINFLOAT: big-endian IEEE double
          uint64_t bits = 0;
          for (int i = 0; i < 8; ++i) bits = bits << 8 | read_u8();
          PickleValue* v = make(Kind::Float);
          std::memcpy(&v->real, &bits, 8);
          push(v);
          break;
        }
        case 0x88: case 0x89: {  // NEWTRUE, NEWFALSE
          PickleValue* v = make(Kind::Bool);
          v->boolean = op == 0x88;
          push(v);
          break;
        }
        case 'N': push(make(Kind::None)); break;
        case 'R': {  // REDUCE: callable(*args), interpreted for the few callables allowed
          const PickleValue* args = pop();
          const PickleValue* callable = pop();
          push(reduce(*callable, *args));
          break;
        }
        case 'Q': push(storage(*pop())); break;  // BINPERSID
        case 's': {                              // SETITEM
          const PickleValue* value = pop();
          const PickleValue* key = pop();
          mutable_top(Kind::Dict)->dict.emplace_back(key, value);
          break;
        }
        case 'u': {  // SETITEMS
          std::vector<const PickleValue*> kv = pop_mark();
          if (kv.size() % 2) fail("SETITEMS with an odd number of items");
          PickleValue* d = mutable_top(Kind::Dict);
          for (size_t i = 0; i < kv.size(); i += 2) d->dict.emplace_back(kv[i], kv[i + 1]);
          break;
        }
        case 'a': {  // APPEND
          const PickleValue* v = pop();
          mutable_top(Kind::List)->items.push_back(v);
          break;
        }
        case 'e': {  // APPENDS
          std::vector<const PickleValue*> vs = pop_mark();
          PickleValue* l = mutable_top(Kind::List);
          l->items.insert(l->items.end(), vs.begin(), vs.end());
          break;
        }
        case 'b': {  // BUILD: sets an object's state. A state_dict's OrderedDict gets its `_metadata`
                     // (module versions) this way; tensors need none of it, so the state is dropped.
          pop();
          const PickleValue* target = peek();
          if (target->kind != Kind::Dict && target->kind != Kind::Tensor)
            fail("BUILD on a " + std::string(pickle_kind_name(target->kind)) + ", which a state_dict never does");
          break;
        }
        case '.': {  // STOP
          const PickleValue* result = pop();
          if (!marks_.empty() || !stack_.empty()) fail("STOP with items or a MARK still on the stack");
          return result;
        }
        default: {
          char hex[8];
          std::snprintf(hex, sizeof hex, "0x%02x", op);
          const char* name = opcode_name(op);
          fail(std::string("unsupported pickle opcode ") + hex +
               (name ? std::string(" (") + name + ")" : std::string(" (not a pickle opcode)")) +
               "; a torch state_dict never uses it");
        }
      }
    }
  }

 private:
  [[noreturn]] void fail(const std::string& what) const {
    throw Error(source_ + ": " + what + " (pickle offset " + std::to_string(op_pos_) + ")");
  }

  uint8_t read_u8() {
    if (pos_ >= bytes_.size()) fail("the pickle ends without STOP; the file is truncated or damaged");
    return bytes_[pos_++];
  }
  uint64_t read_uint(size_t n) {  // little-endian, n <= 8
    if (bytes_.size() - pos_ < n) fail("the pickle ends inside an opcode's argument; the file is truncated");
    uint64_t v = 0;
    for (size_t i = 0; i < n; ++i) v |= static_cast<uint64_t>(bytes_[pos_ + i]) << (8 * i);
    pos_ += n;
    return v;
  }
  std::string read_line() {
    const size_t start = pos_;
    while (pos_ < bytes_.size() && bytes_[pos_] != '\n') {
      if (pos_ - start >= kMaxGlobalName) fail("a GLOBAL name longer than " + std::to_string(kMaxGlobalName));
      ++pos_;
    }
    if (pos_ >= bytes_.size()) fail("the pickle ends inside a GLOBAL name; the file is truncated");
    std::string s(reinterpret_cast<const char*>(bytes_.data()) + start, pos_ - start);
    ++pos_;
    return s;
  }

  PickleValue* make(Kind k) {
    PickleValue& v = out_.values_.emplace_back();
    v.kind = k;
    return &v;
  }
  PickleValue* integer(int64_t i) {
    PickleValue* v = make(Kind::Int);
    v->integer = i;
    return v;
  }
  PickleValue* string(uint64_t len) {
    if (len > bytes_.size() - pos_)
      fail("a string of " + std::to_string(len) + " bytes runs past the end of the pickle (" +
           std::to_string(bytes_.size() - pos_) + " left)");
    PickleValue* v = make(Kind::String);
    v->text.assign(reinterpret_cast<const char*>(bytes_.data()) + pos_, len);
    pos_ += len;
    return v;
  }
  PickleValue* global(const std::string& name) {
    if (!allowed_global(name))
      fail("pickle asks for global '" + name + "', which a state_dict never needs; refusing to load it");
    PickleValue* v = make(Kind::Global);
    v->text = name;
    return v;
  }

  // The stack below the innermost MARK belongs to an outer construct and cannot be popped.
  size_t floor() const { return marks_.empty() ? 0 : marks_.back(); }
  void push(const PickleValue* v) {
    if (stack_.size() >= kMaxStack) fail("the pickle stack grows past " + std::to_string(kMaxStack) + " items");
    stack_.push_back(v);
  }
  const PickleValue* pop() {
    if (stack_.size() <= floor()) fail("an opcode pops from an empty stack (or across a MARK)");
    const PickleValue* v = stack_.back();
    stack_.pop_back();
    return v;
  }
  const PickleValue* peek() {
    if (stack_.size() <= floor()) fail("an opcode needs an item on an empty stack (or across a MARK)");
    return stack_.back();
  }
  // Containers on the stack are filled in place by SETITEM(S)/APPEND(S). The values are ours (made
  // by make()), so casting away the const that the stack shows is safe.
  PickleValue* mutable_top(Kind want) {
    const PickleValue* v = peek();
    if (v->kind != want)
      fail("an opcode adds items to a " + std::string(pickle_kind_name(v->kind)) + ", expected a " +
           pickle_kind_name(want));
    return const_cast<PickleValue*>(v);
  }
  std::vector<const PickleValue*> pop_mark() {
    if (marks_.empty()) fail("an opcode needs a MARK but none is open");
    const size_t m = marks_.back();
    marks_.pop_back();
    std::vector<const PickleValue*> items(stack_.begin() + static_cast<ptrdiff_t>(m), stack_.end());
    stack_.resize(m);
    return items;
  }

  void memo_put(uint64_t index) { memo_[index] = peek(); }
  const PickleValue* memo_get(uint64_t index) {
    auto it = memo_.find(index);
    if (it == memo_.end()) fail("memo slot " + std::to_string(index) + " is read before it is written");
    return it->second;
  }

  // BINPERSID with ('storage', torch.<X>Storage, key, location, numel): torch's reference to the
  // archive entry data/<key>.
  const PickleValue* storage(const PickleValue& pid) {
    const auto& f = pid.items;
    if (pid.kind != Kind::Tuple || f.size() != 5 || f[0]->kind != Kind::String || f[0]->text != "storage")
      fail("a persistent id that is not ('storage', type, key, location, numel)");
    const StorageType* type = f[1]->kind == Kind::Global ? storage_type(f[1]->text) : nullptr;
    if (!type) fail("a storage whose type is a " + std::string(pickle_kind_name(f[1]->kind)) + " '" + f[1]->text +
                    "', not a typed torch storage");
    if (f[2]->kind != Kind::String || f[3]->kind != Kind::String || f[4]->kind != Kind::Int || f[4]->integer < 0)
      fail("a storage reference with a malformed key, location or size");
    PickleValue* s = make(Kind::Storage);
    s->dtype = type->dtype;
    s->text = f[2]->text;
    s->location = f[3]->text;
    s->numel = f[4]->integer;
    return s;
  }

  static bool int_tuple(const PickleValue& v) {
    if (v.kind != Kind::Tuple) return false;
    for (const PickleValue* i : v.items)
      if (i->kind != Kind::Int) return false;
    return true;
  }

  const PickleValue* reduce(const PickleValue& callable, const PickleValue& args) {
    if (callable.kind != Kind::Global) fail("REDUCE calls a " + std::string(pickle_kind_name(callable.kind)));
    if (args.kind != Kind::Tuple) fail("REDUCE with arguments that are not a tuple");
    const auto& a = args.items;
    const std::string& fn = callable.text;
    if (fn == kOrderedDict) {
      if (!a.empty()) fail("OrderedDict built from arguments; torch pickles it empty and fills it");
      return make(Kind::Dict);
    }
    if (fn == kRebuildTensor) {
      // (storage, storage_offset, size, stride, requires_grad, backward_hooks[, metadata])
      if (a.size() < 6 || a.size() > 7 || a[0]->kind != Kind::Storage || a[1]->kind != Kind::Int ||
          !int_tuple(*a[2]) || !int_tuple(*a[3]) || a[2]->items.size() != a[3]->items.size())
        fail("_rebuild_tensor_v2 with arguments other than (storage, offset, size, stride, ...)");
      PickleValue* t = make(Kind::Tensor);
      t->storage = a[0];
      t->storage_offset = a[1]->integer;
      for (const PickleValue* d : a[2]->items) t->size.push_back(d->integer);
      for (const PickleValue* d : a[3]->items) t->stride.push_back(d->integer);
      if (t->storage_offset < 0) fail("a tensor with a negative storage offset");
      for (int64_t d : t->size)
        if (d < 0) fail("a tensor with a negative size " + shape_str(t->size));
      return t;
    }
    if (fn == kRebuildParameter) {  // nn.Parameter(tensor, requires_grad, hooks): the tensor is all we keep
      if (a.size() != 3 || a[0]->kind != Kind::Tensor) fail("_rebuild_parameter with arguments other than (tensor, ...)");
      return a[0];
    }
    fail("REDUCE calls '" + fn + "', which only ever appears as a value in a state_dict");
  }

  Pickle& out_;
  std::span<const uint8_t> bytes_;
  const std::string& source_;
  size_t pos_ = 0, op_pos_ = 0;
  std::vector<const PickleValue*> stack_;
  std::vector<size_t> marks_;
  std::unordered_map<uint64_t, const PickleValue*> memo_;
};

Pickle::Pickle(std::span<const uint8_t> bytes, std::string source) {
  root_ = Unpickler(*this, bytes, source).run();
}

}  // namespace segany::io
