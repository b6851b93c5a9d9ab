package fakepg

import (
	"encoding/binary"
	"math"
	"net"
	"strconv"
	"strings"
)

// Type OIDs, as in PostgreSQL's pg_type.
const (
	oidBool    uint32 = 16
	oidInt8    uint32 = 20
	oidInt2    uint32 = 21
	oidInt4    uint32 = 23
	oidText    uint32 = 25
	oidFloat4  uint32 = 700
	oidFloat8  uint32 = 701
	oidInet    uint32 = 869
	oidVarchar uint32 = 1043
	oidVoid    uint32 = 2278
)

// Values are held as int64, float64, string, bool, net.IP (inet) or nil (NULL).

var typeNames = map[string]uint32{
	"bool": oidBool, "boolean": oidBool,
	"int8": oidInt8, "bigint": oidInt8,
	"int2": oidInt2, "smallint": oidInt2,
	"int": oidInt4, "int4": oidInt4, "integer": oidInt4,
	"text": oidText, "varchar": oidVarchar, "string": oidText,
	"float4": oidFloat4, "real": oidFloat4,
	"float8": oidFloat8, "float": oidFloat8,
	"inet": oidInet,
}

func typeSize(oid uint32) int16 {
	switch oid {
	case oidBool:
		return 1
	case oidInt2:
		return 2
	case oidInt4, oidFloat4:
		return 4
	case oidInt8, oidFloat8:
		return 8
	default:
		return -1
	}
}

func isIntType(oid uint32) bool { return oid == oidInt2 || oid == oidInt4 || oid == oidInt8 }

func invalidText(oid uint32, s string) *sqlError {
	return errorf("22P02", "invalid input syntax for type "+typeName(oid)+": \""+s+"\"")
}

func typeName(oid uint32) string {
	switch oid {
	case oidBool:
		return "boolean"
	case oidInt2:
		return "smallint"
	case oidInt4:
		return "integer"
	case oidInt8:
		return "bigint"
	case oidFloat4:
		return "real"
	case oidFloat8:
		return "double precision"
	case oidInet:
		return "inet"
	case oidVoid:
		return "void"
	default:
		return "text"
	}
}

// decodeParam turns a Bind parameter into a value of type oid.
func decodeParam(raw []byte, format int16, oid uint32) (any, error) {
	if raw == nil {
		return nil, nil
	}
	if format == 0 {
		return coerce(string(raw), oid)
	}
	bad := errorf("22P03", "incorrect binary data format in bind parameter for type "+typeName(oid))
	switch oid {
	case oidBool:
		if len(raw) != 1 {
			return nil, bad
		}
		return raw[0] != 0, nil
	case oidInt2:
		if len(raw) != 2 {
			return nil, bad
		}
		return int64(int16(binary.BigEndian.Uint16(raw))), nil
	case oidInt4:
		if len(raw) != 4 {
			return nil, bad
		}
		return int64(int32(binary.BigEndian.Uint32(raw))), nil
	case oidInt8:
		if len(raw) != 8 {
			return nil, bad
		}
		return int64(binary.BigEndian.Uint64(raw)), nil
	case oidFloat4:
		if len(raw) != 4 {
			return nil, bad
		}
		return float64(math.Float32frombits(binary.BigEndian.Uint32(raw))), nil
	case oidFloat8:
		if len(raw) != 8 {
			return nil, bad
		}
		return math.Float64frombits(binary.BigEndian.Uint64(raw)), nil
	case oidText, oidVarchar:
		return string(raw), nil
	default:
		return nil, errorf("0A000", "fakepg: binary parameters of type "+typeName(oid)+" are not supported")
	}
}

// coerce converts v to type oid, as an assignment or a cast would.
func coerce(v any, oid uint32) (any, error) {
	if v == nil {
		return nil, nil
	}
	switch oid {
	case oidInt2, oidInt4, oidInt8:
		var n int64
		switch x := v.(type) {
		case int64:
			n = x
		case float64:
			n = int64(math.RoundToEven(x))
		case bool:
			if x {
				n = 1
			}
		case string:
			var err error
			if n, err = strconv.ParseInt(strings.TrimSpace(x), 10, 64); err != nil {
				return nil, invalidText(oid, x)
			}
		default:
			return nil, errorf("42846", "cannot cast to "+typeName(oid))
		}
		lim := map[uint32]int64{oidInt2: math.MaxInt16, oidInt4: math.MaxInt32, oidInt8: math.MaxInt64}[oid]
		if n > lim || n < -lim-1 {
			return nil, errorf("22003", typeName(oid)+" out of range")
		}
		return n, nil
	case oidFloat4, oidFloat8:
		switch x := v.(type) {
		case int64:
			return float64(x), nil
		case float64:
			return x, nil
		case string:
			f, err := strconv.ParseFloat(strings.TrimSpace(x), 64)
			if err != nil {
				return nil, invalidText(oid, x)
			}
			return f, nil
		}
		return nil, errorf("42846", "cannot cast to "+typeName(oid))
	case oidBool:
		switch x := v.(type) {
		case bool:
			return x, nil
		case int64:
			return x != 0, nil
		case string:
			switch strings.ToLower(strings.TrimSpace(x)) {
			case "t", "true", "yes", "on", "1":
				return true, nil
			case "f", "false", "no", "off", "0":
				return false, nil
			}
			return nil, invalidText(oid, x)
		}
		return nil, errorf("42846", "cannot cast to boolean")
	case oidInet:
		if x, ok := v.(net.IP); ok {
			return x, nil
		}
		if x, ok := v.(string); ok {
			if ip := net.ParseIP(strings.TrimSuffix(strings.TrimSuffix(x, "/32"), "/128")); ip != nil {
				return ip, nil
			}
			return nil, invalidText(oid, x)
		}
		return nil, errorf("42846", "cannot cast to inet")
	default: // text and everything shown as text
		return textOf(v), nil
	}
}

// textOf is PostgreSQL's text output of v (NULL aside).
func textOf(v any) string {
	switch x := v.(type) {
	case int64:
		return strconv.FormatInt(x, 10)
	case float64:
		return strconv.FormatFloat(x, 'g', -1, 64)
	case bool:
		if x {
			return "t"
		}
		return "f"
	case net.IP:
		if x.To4() != nil {
			return x.String() + "/32"
		}
		return x.String() + "/128"
	case string:
		return x
	default:
		return ""
	}
}

// encodeValue encodes v of type oid for a DataRow.
func encodeValue(v any, oid uint32, format int16) ([]byte, error) {
	if v == nil {
		return nil, nil
	}
	if format == 0 {
		if oid == oidInet {
			if ip, ok := v.(net.IP); ok {
				return []byte(ip.String()), nil // inet output omits a full-length mask
			}
		}
		if oid == oidVoid {
			return []byte{}, nil
		}
		return []byte(textOf(v)), nil
	}
	v, err := coerce(v, oid)
	if err != nil {
		return nil, err
	}
	switch oid {
	case oidBool:
		if v.(bool) {
			return []byte{1}, nil
		}
		return []byte{0}, nil
	case oidInt2:
		return binary.BigEndian.AppendUint16(nil, uint16(v.(int64))), nil
	case oidInt4:
		return binary.BigEndian.AppendUint32(nil, uint32(v.(int64))), nil
	case oidInt8:
		return binary.BigEndian.AppendUint64(nil, uint64(v.(int64))), nil
	case oidFloat4:
		return binary.BigEndian.AppendUint32(nil, math.Float32bits(float32(v.(float64)))), nil
	case oidFloat8:
		return binary.BigEndian.AppendUint64(nil, math.Float64bits(v.(float64))), nil
	case oidText, oidVarchar:
		return []byte(v.(string)), nil
	case oidVoid:
		return []byte{}, nil
	case oidInet:
		ip := v.(net.IP)
		if ip4 := ip.To4(); ip4 != nil {
			return append([]byte{2, 32, 0, 4}, ip4...), nil // AF_INET, /32, not cidr
		}
		return append([]byte{3, 128, 0, 16}, ip.To16()...), nil
	default:
		return nil, errorf("0A000", "fakepg: binary results of type "+typeName(oid)+" are not supported")
	}
}
